//! Tool calling for chat completions: reading `tools` and `tool_choice`,
//! telling the model about the tools, the JSON schema that forces a call
//! (`required` or a named function), and reading a call back out of the
//! model's answer.
//!
//! The model is told about the tools in a generic system prompt
//! ([`ToolMode::system_prompt`]): the tools as JSON and the call format, one
//! JSON object `{"name": ..., "arguments": {...}}`. SmolLM2's chat template
//! takes no `tools`; passing them to a template that does is not built yet. Forced calls are enforced with the
//! same constrained decoding as `response_format`. Not here: the response
//! shapes (`protocol`) and the streaming of calls (`handlers`).

use serde_json::Value;

use super::protocol::{FunctionCall, RequestFault, ToolCall};

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// A JSON schema of the arguments object.
    pub parameters: Value,
}

/// What `tool_choice` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model must not call: the tools are not shown to it.
    None,
    /// The model may call one, or answer in text.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this one.
    Named(String),
}

/// The tools of a request and how they may be used.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolMode {
    pub tools: Vec<Tool>,
    pub choice: ToolChoice,
}

fn fault(field: &str, why: String) -> RequestFault {
    RequestFault {
        message: format!("{field} {why}"),
        param: Some(field.to_string()),
    }
}

impl ToolMode {
    /// Reads `tools` and `tool_choice` as OpenAI defines them; `None` when
    /// there are no tools. `tool_choice` defaults to `auto` with tools.
    pub fn from_request(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
    ) -> Result<Option<ToolMode>, RequestFault> {
        let tools = match tools.filter(|t| !t.is_null()) {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, t)| tool(i, t))
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(fault("tools", format!("must be a list, got {other}"))),
        };
        let choice = match tool_choice.filter(|c| !c.is_null()) {
            None if tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(v @ Value::Object(_)) => match v["function"]["name"].as_str() {
                Some(name) if v["type"] == "function" => ToolChoice::Named(name.to_string()),
                _ => {
                    return Err(fault(
                        "tool_choice",
                        format!(
                            "must be none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {v}"
                        ),
                    ));
                }
            },
            Some(other) => {
                return Err(fault(
                    "tool_choice",
                    format!("must be none, auto, required or a named function, got {other}"),
                ));
            }
        };
        if tools.is_empty() {
            return match choice {
                ToolChoice::None | ToolChoice::Auto => Ok(None),
                _ => Err(fault("tool_choice", "needs tools to choose from".into())),
            };
        }
        if let ToolChoice::Named(name) = &choice
            && !tools.iter().any(|t| &t.name == name)
        {
            return Err(fault(
                "tool_choice",
                format!("names function {name:?}, which is not among the tools"),
            ));
        }
        Ok(Some(ToolMode { tools, choice }))
    }

    /// The tools the model may call under this choice.
    fn callable(&self) -> impl Iterator<Item = &Tool> {
        self.tools.iter().filter(move |t| match &self.choice {
            ToolChoice::None => false,
            ToolChoice::Auto | ToolChoice::Required => true,
            ToolChoice::Named(name) => &t.name == name,
        })
    }

    /// The JSON schema a forced call must match (`required`, named), as
    /// text; `None` when the model may answer freely.
    pub fn forced_schema(&self) -> Option<String> {
        if !matches!(self.choice, ToolChoice::Required | ToolChoice::Named(_)) {
            return None;
        }
        let calls: Vec<Value> = self
            .callable()
            .map(|t| {
                serde_json::json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        "arguments": t.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = match <[Value; 1]>::try_from(calls) {
            Ok([one]) => one,
            Err(many) => serde_json::json!({ "anyOf": many }),
        };
        Some(schema.to_string())
    }

    /// The generic system prompt that describes the tools, for templates
    /// that take none; `None` under `tool_choice: none`.
    pub fn system_prompt(&self) -> Option<String> {
        let tools: Vec<String> = self
            .callable()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                })
                .to_string()
            })
            .collect();
        if tools.is_empty() {
            return None;
        }
        let must = match self.choice {
            ToolChoice::Auto => "You may call one of these tools",
            _ => "Call one of these tools",
        };
        Some(format!(
            "{must}. To call a tool, answer with only a JSON object \
             {{\"name\": <tool name>, \"arguments\": <arguments object>}}.\n\
             Tools:\n{}",
            tools.join("\n")
        ))
    }

    /// The call in a finished answer: the whole text is one JSON object
    /// naming a callable tool, with an arguments object. `None` otherwise
    /// (under `auto` the answer is then text).
    pub fn parse_call(&self, text: &str) -> Option<ToolCall> {
        let value: Value = serde_json::from_str(text.trim()).ok()?;
        let name = value.get("name")?.as_str()?;
        let arguments = value.get("arguments").filter(|a| a.is_object())?;
        self.callable().find(|t| t.name == name)?;
        Some(ToolCall {
            id: format!("call_{:024x}", rand::random::<u128>() >> 32),
            kind: "function".into(),
            function: FunctionCall {
                name: name.to_string(),
                arguments: arguments.to_string(),
            },
        })
    }
}

/// `tools[index]`: `{"type": "function", "function": {name, description?,
/// parameters?}}`.
fn tool(index: usize, value: &Value) -> Result<Tool, RequestFault> {
    let field = format!("tools[{index}]");
    if value["type"] != "function" {
        return Err(fault(
            "tools",
            format!(
                "entry {index} must have type \"function\", got {}",
                value["type"]
            ),
        ));
    }
    let function = &value["function"];
    let name = function["name"]
        .as_str()
        .filter(|n| {
            !n.is_empty()
                && n.len() <= 64
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
        .ok_or_else(|| {
            fault(
                "tools",
                format!("{field}.function.name must be 1-64 letters, digits, _ or -"),
            )
        })?;
    let parameters = match &function["parameters"] {
        Value::Null => serde_json::json!({"type": "object", "properties": {}}),
        p @ Value::Object(_) => p.clone(),
        other => {
            return Err(fault(
                "tools",
                format!("{field}.function.parameters must be a JSON schema object, got {other}"),
            ));
        }
    };
    Ok(Tool {
        name: name.to_string(),
        description: function["description"].as_str().map(str::to_string),
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        serde_json::json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}}])
    }

    fn mode(choice: Value) -> Result<Option<ToolMode>, Option<String>> {
        ToolMode::from_request(Some(&weather()), Some(&choice)).map_err(|f| f.param)
    }

    #[test]
    fn tool_choice_decides_what_is_forced_and_shown() {
        let auto = mode(Value::Null).unwrap().unwrap();
        assert_eq!(auto.choice, ToolChoice::Auto);
        assert_eq!(auto.forced_schema(), None);
        assert!(auto.system_prompt().unwrap().contains("get_time"));

        let none = mode("none".into()).unwrap().unwrap();
        assert_eq!(none.system_prompt(), None, "tools are not shown");

        let required = mode("required".into()).unwrap().unwrap();
        let schema: Value = serde_json::from_str(&required.forced_schema().unwrap()).unwrap();
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);

        let named =
            mode(serde_json::json!({"type": "function", "function": {"name": "get_weather"}}))
                .unwrap()
                .unwrap();
        let schema: Value = serde_json::from_str(&named.forced_schema().unwrap()).unwrap();
        assert_eq!(schema["properties"]["name"]["const"], "get_weather");
        assert!(!named.system_prompt().unwrap().contains("get_time"));
    }

    #[test]
    fn bad_tools_and_choices_are_refused_by_name() {
        assert_eq!(mode("sometimes".into()), Err(Some("tool_choice".into())));
        assert_eq!(
            mode(serde_json::json!({"type": "function", "function": {"name": "nope"}})),
            Err(Some("tool_choice".into()))
        );
        let bad = serde_json::json!([{"type": "function", "function": {"name": "a b"}}]);
        assert_eq!(
            ToolMode::from_request(Some(&bad), None).map_err(|f| f.param),
            Err(Some("tools".into()))
        );
        assert_eq!(
            ToolMode::from_request(None, Some(&"required".into())).map_err(|f| f.param),
            Err(Some("tool_choice".into()))
        );
        assert_eq!(ToolMode::from_request(None, Some(&"auto".into())), Ok(None));
    }

    #[test]
    fn a_call_is_read_from_a_json_answer_only() {
        let auto = mode(Value::Null).unwrap().unwrap();
        let call = auto
            .parse_call(r#" {"name": "get_weather", "arguments": {"city": "Paris"}}"#)
            .unwrap();
        assert_eq!(call.function.name, "get_weather");
        assert_eq!(call.function.arguments, r#"{"city":"Paris"}"#);
        assert!(
            call.id.starts_with("call_") && call.id.len() == 29,
            "{}",
            call.id
        );
        assert_eq!(auto.parse_call("It is sunny in Paris."), None);
        assert_eq!(
            auto.parse_call(r#"{"name": "unknown", "arguments": {}}"#),
            None
        );
    }
}

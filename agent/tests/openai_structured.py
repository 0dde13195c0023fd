"""Structured output and tool calls through the official OpenAI Python client.

Run by agent/tests/openai_client.rs as
    <venv python> openai_structured.py <base URL> <model>
against `xpyd-agent up` with a prefill worker. Exits non-zero (with the
failed check's message) unless `chat.completions.parse` with a pydantic
model returns a parsed object on the local path and with a remote prefill,
twenty sampled answers to a nested schema (objects, enums, arrays) all
validate, json_object streams JSON, a schema that cannot be compiled
gets a 400 naming response_format; and a tool-call round trip (call, tool
result, final answer) works whole and streamed, with `required` and named
`tool_choice`, while `auto` gives text when the model does not call.
"""

import concurrent.futures
import enum
import json
import sys
import urllib.request
from typing import Annotated, List

import openai
import pydantic
from pydantic import BaseModel, Field

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", timeout=300, max_retries=0)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what.split(":")[0], flush=True)


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class Address(BaseModel):
    city: str = Field(max_length=24)
    country: str = Field(max_length=24)


class Person(BaseModel):
    # Bounded strings and lists: the grammar itself ends the output, so a
    # small model cannot run into max_tokens halfway through a string.
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)
    favourite_colour: Colour
    address: Address
    hobbies: List[Annotated[str, Field(max_length=16)]] = Field(max_length=3)


def remote_prefills():
    metrics = urllib.request.urlopen(base_url + "/metrics", timeout=30).read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("xpyd_decode_prefills_total{") and 'location="remote"' in line
    )


ASK = [{"role": "user", "content": "Describe Marie, a 34 year old painter from Lyon, France."}]

# Local prefill, greedy.
local = client.chat.completions.parse(
    model=model, messages=ASK, response_format=Person, temperature=0, max_tokens=300,
)
person = local.choices[0].message.parsed
check(isinstance(person, Person), f"parse returns a Person on the local path: {local.choices[0].message.content!r}")
check(local.choices[0].finish_reason == "stop", f"the JSON ends the answer: {local.choices[0].finish_reason}")
print("   ", local.choices[0].message.content, flush=True)

# A prompt longer than --max-local-prefill-length: the first token is
# sampled on the prefill worker, under the same grammar.
before = remote_prefills()
LONG = [{"role": "system", "content": "You are a helpful assistant. " * 16}] + ASK
remote = client.chat.completions.parse(
    model=model, messages=LONG, response_format=Person, temperature=0, max_tokens=300,
)
check(isinstance(remote.choices[0].message.parsed, Person),
      f"parse returns a Person with a remote prefill: {remote.choices[0].message.content!r}")
check(remote_prefills() > before, f"that prompt was prefilled remotely: {before} -> {remote_prefills()}")
print("   ", remote.choices[0].message.content, flush=True)

# Twenty different prompts, sampled: every answer validates (pydantic checks
# types, enums, nesting, lengths; parse raises otherwise).
PROMPTS = [
    "Describe a person.", "Tell me about a chef from Rome.", "Invent a pirate.",
    "Who is the oldest person you know?", "Describe a child who loves football.",
    "Write a haiku about the sea.", "Name the capital of France.", "Describe a Japanese engineer.",
    "Give me a profile of a retired teacher.", "Describe a musician from Brazil.",
    "Make up a detective.", "Describe someone whose favourite colour is green.",
    "Describe a baker in Berlin.", "Who would you invite to dinner?", "Describe a nurse.",
    "Tell me about an astronaut.", "Describe a farmer in Kenya.", "Make up a character for a novel.",
    "Describe a student in Toronto.", "What is 2 + 2?",
]


def answer(i):
    r = client.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": PROMPTS[i]}],
        response_format=Person, temperature=1.0, seed=i, max_tokens=300,
    )
    return r.choices[0]


with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
    choices = list(pool.map(answer, range(len(PROMPTS))))
for c in choices:
    check(c.finish_reason == "stop" and isinstance(c.message.parsed, Person),
          f"a sampled answer validates: {c.finish_reason} {c.message.content!r}")
    Person.model_validate_json(c.message.content)
distinct = {c.message.content for c in choices}
check(len(distinct) > 10, f"the twenty answers differ: {len(distinct)} distinct")

# json_object, streamed: the pieces join into one JSON object.
pieces, finish = [], None
for chunk in client.chat.completions.create(
    model=model, messages=ASK, response_format={"type": "json_object"}, temperature=0,
    max_tokens=200, stream=True,
):
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
text = "".join(pieces)
try:
    obj = json.loads(text)
except ValueError:
    obj = None
check(isinstance(obj, dict), f"streamed json_object output is a JSON object: {text!r} ({finish})")

# Too few tokens for the JSON: finish_reason says so, and parse refuses to
# pretend (as with OpenAI).
try:
    client.chat.completions.parse(
        model=model, messages=ASK, response_format=Person, temperature=0, max_tokens=5,
    )
    check(False, "a JSON cut by max_tokens is reported")
except openai.LengthFinishReasonError as e:
    check(True, f"a JSON cut by max_tokens raises LengthFinishReasonError: {e}")

# A schema llguidance cannot compile.
try:
    client.chat.completions.create(
        model=model, messages=ASK, max_tokens=5,
        response_format={"type": "json_schema", "json_schema": {
            "name": "broken", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}},
    )
    check(False, "an uncompilable schema is refused")
except openai.BadRequestError as e:
    check(e.status_code == 400 and e.body.get("param") == "response_format" and "schema" in str(e),
          f"an uncompilable schema is a 400 naming response_format: {e}")

# Tools.
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now"}}]
WEATHER = [{"role": "user", "content": "What is the weather like in Paris?"}]

call = client.chat.completions.create(
    model=model, messages=WEATHER, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=100,
)
c = call.choices[0]
check(c.finish_reason == "tool_calls" and c.message.content is None and len(c.message.tool_calls or []) == 1,
      f"tool_choice=required gives one tool call: {c}")
tc = c.message.tool_calls[0]
args = json.loads(tc.function.arguments)
check(tc.id.startswith("call_") and tc.type == "function" and tc.function.name in ("get_weather", "get_time"),
      f"the call names a tool: {tc}")
if tc.function.name == "get_weather":
    check(isinstance(args.get("city"), str), f"its arguments match the tool's schema: {args}")
print("   ", tc.function.name, tc.function.arguments, flush=True)

# The round trip: the call and the tool's answer go back in the next turn.
turn = WEATHER + [c.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": tc.id, "content": "18 degrees and sunny"}]
final = client.chat.completions.create(
    model=model, messages=turn, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=60,
)
f = final.choices[0]
check(f.message.tool_calls is None and isinstance(f.message.content, str) and f.message.content.strip(),
      f"the answer after the tool result is text: {f.message.content!r}")
bare = client.chat.completions.create(
    model=model, messages=WEATHER, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=1,
)
check(final.usage.prompt_tokens > bare.usage.prompt_tokens + 10,
      f"the call and the tool result are in the prompt: {final.usage.prompt_tokens} vs {bare.usage.prompt_tokens}")
print("   ", f.message.content, flush=True)

# Streamed, with a named function, assembled by the client's own helper.
with client.chat.completions.stream(
    model=model, messages=WEATHER, tools=TOOLS, temperature=0, max_tokens=100,
    tool_choice={"type": "function", "function": {"name": "get_weather"}},
) as stream:
    streamed = stream.get_final_completion()
s0 = streamed.choices[0]
check(s0.finish_reason == "tool_calls" and s0.message.tool_calls[0].function.name == "get_weather"
      and isinstance(json.loads(s0.message.tool_calls[0].function.arguments).get("city"), str),
      f"a streamed named call assembles: {s0.message}")
turn = WEATHER + [s0.message.model_dump(exclude_none=True, exclude={"parsed", "refusal"}),
                  {"role": "tool", "tool_call_id": s0.message.tool_calls[0].id, "content": "18 degrees and sunny"}]
pieces = []
for chunk in client.chat.completions.create(
    model=model, messages=turn, tools=TOOLS, temperature=0, max_tokens=60, stream=True,
    tool_choice="none",
):
    if chunk.choices:
        pieces.append(chunk.choices[0].delta.content or "")
check("".join(pieces).strip(), f"the streamed answer after the tool result is text: {''.join(pieces)!r}")

# auto: a plain answer stays text.
FRANCE = [{"role": "user", "content": "Name the capital of France."}]
auto = client.chat.completions.create(
    model=model, messages=FRANCE, tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=40,
)
a = auto.choices[0]
check(a.message.tool_calls is None and a.finish_reason in ("stop", "length") and a.message.content,
      f"tool_choice=auto with a plain answer gives text: {a.message.content!r}")

try:
    client.chat.completions.create(
        model=model, messages=WEATHER, tools=TOOLS, max_tokens=5,
        tool_choice={"type": "function", "function": {"name": "no_such_tool"}},
    )
    check(False, "a named tool that is not among the tools is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "tool_choice", f"an unknown named tool is a 400 naming tool_choice: {e}")

try:
    client.chat.completions.create(
        model=model, messages=WEATHER, max_tokens=5, tool_choice="required",
        tools=[{"type": "function", "function": {"name": "broken", "parameters": {
            "type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}}],
    )
    check(False, "a tool whose parameters cannot be compiled is refused")
except openai.BadRequestError as e:
    check(e.body.get("param") == "tools", f"uncompilable tool parameters are a 400 naming tools: {e}")

print("all structured output checks passed", flush=True)

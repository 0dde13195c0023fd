//! `xpyd-agent up --device sim` as a user runs it: simulated engines
//! behind the real frontend, router, bus and NIXL. It says at startup that
//! it is simulated, every chat answer carries `x-xpyd-simulated: true` and
//! placeholder text (never the real answer), `/v1/models` and `/metrics`
//! say so too, and a long prompt's KV still goes from the simulated prefill
//! worker to a simulated decode worker over NIXL, decoding exactly as a
//! locally prefilled one.

mod common;

use std::time::Duration;

#[tokio::test]
async fn up_with_simulated_engines_answers_labelled_placeholders() {
    let mut up = common::Up::start(&[
        "--device",
        "sim",
        "--num-blocks",
        "256",
        "--decode",
        "2",
        "--max-local-prefill-length",
        "64",
    ]);
    let url = up.url.clone();
    // Startup says so, in the lines after the URL, and the curl line it
    // prints asks for few tokens (a simulated answer has no EOS).
    let lines: Vec<String> = (0..4)
        .map(|_| up.next_line(Duration::from_secs(10)))
        .collect();
    assert!(
        lines.iter().any(|l| l.starts_with("SIMULATED")),
        "no SIMULATED notice at startup: {lines:?}"
    );
    let curl = lines.iter().find(|l| l.starts_with("try: curl ")).unwrap();
    assert!(curl.contains("\"max_tokens\": 16"), "{curl}");

    let client = reqwest::Client::new();
    let mut body = common::chat_request(&[("user", common::FRANCE)]);
    body["max_tokens"] = 8.into();
    let resp = client
        .post(format!("{url}/v1/chat/completions"))
        .timeout(Duration::from_secs(120))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("x-xpyd-simulated")
            .map(|v| v.to_str().unwrap()),
        Some("true"),
        "{:?}",
        resp.headers()
    );
    let answer: serde_json::Value = resp.json().await.unwrap();
    let text = common::answer(&answer);
    assert!(!text.contains("Paris"), "{answer}");
    assert!(text.contains("sim"), "{answer}");
    assert_eq!(answer["choices"][0]["finish_reason"], "length", "{answer}");
    assert_eq!(answer["usage"]["completion_tokens"], 8, "{answer}");

    let models: serde_json::Value = reqwest::get(format!("{url}/v1/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], common::MODEL, "{models}");
    assert_eq!(models["data"][0]["owned_by"], "xpyd-simulated", "{models}");

    // A prompt over the threshold: prefilled by the simulated prefill
    // worker, its KV written into a decode worker's blocks over NIXL. The
    // same prompt again is mostly a prefix-cache hit, prefilled locally; a
    // simulated token is a hash of the KV it reads, so equal answers mean
    // the transferred blocks held the prompt.
    let long_system = "You are a helpful assistant. ".repeat(16);
    let mut body = common::chat_request(&[("system", &long_system), ("user", common::FRANCE)]);
    body["max_tokens"] = 12.into();
    let remote = common::chat(&url, &body).await;
    let again = common::chat(&url, &body).await;
    assert_eq!(common::answer(&remote), common::answer(&again));
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .is_some_and(|c| c > 64),
        "{again}"
    );

    let metrics = common::metrics(&url).await;
    let remote_prefills = common::sum_samples(
        &metrics,
        "xpyd_decode_prefills_total",
        "location=\"remote\"",
    );
    assert_eq!(remote_prefills, 1.0, "{metrics}");
    // One info series per worker: two decode, one prefill.
    assert_eq!(
        common::sum_samples(&metrics, "xpyd_engine_info", "device=\"sim\""),
        3.0,
        "{metrics}"
    );

    let (status, _) = up.interrupt();
    assert!(status.success(), "exit status {status}");
}

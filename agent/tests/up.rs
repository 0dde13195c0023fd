//! `xpyd-agent up` as a user runs it: the real binary serves the bundled
//! model over HTTP with one prefill and one decode worker, answers the
//! France question (a short prompt, prefilled by the decode worker), hands a
//! long prompt's KV from the prefill worker to the decode worker over NIXL,
//! and stops cleanly on Ctrl-C.

mod common;

#[tokio::test]
async fn up_answers_the_france_question_and_stops_on_ctrl_c() {
    let mut up = common::Up::start(&["--num-blocks", "128", "--max-local-prefill-length", "64"]);
    let url = up.url.clone();

    // The curl line it prints, sent as printed, answers plainly: the first
    // thing a newcomer sees is the right answer.
    let curl = up.next_line(std::time::Duration::from_secs(10));
    assert!(curl.starts_with("try: curl "), "{curl}");
    let printed_body = curl
        .split_once("-d '")
        .and_then(|(_, rest)| rest.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no -d '...' body in {curl}"));
    let printed: serde_json::Value = serde_json::from_str(printed_body).unwrap();
    assert_eq!(printed["temperature"], 0, "{curl}");
    let resp = common::chat(&url, &printed).await;
    assert_eq!(
        resp["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "the printed curl line: {resp}"
    );

    let resp = common::chat(&url, &common::chat_request(&[("user", common::FRANCE)])).await;
    assert_eq!(
        resp["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{resp}"
    );
    assert_eq!(resp["choices"][0]["finish_reason"], "stop", "{resp}");

    // A prompt over the threshold is prefilled by the prefill worker and its
    // KV written into the decode worker's blocks: same answer.
    let long_system = "You are a helpful assistant. ".repeat(16);
    let mut body = common::chat_request(&[("system", &long_system), ("user", common::FRANCE)]);
    body["max_tokens"] = 12.into();
    let resp = common::chat(&url, &body).await;
    let text = resp["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Paris"), "{resp}");
    let metrics = common::metrics(&url).await;
    let remote = common::sum_samples(
        &metrics,
        "xpyd_decode_prefills_total",
        "location=\"remote\"",
    );
    assert_eq!(remote, 1.0, "{metrics}");

    // Ctrl-C: the server stops and the process exits successfully.
    let (status, rest) = up.interrupt();
    assert!(status.success(), "exit status {status}");
    assert!(rest.iter().any(|l| l == "xpyd stopped"), "{rest:?}");
}

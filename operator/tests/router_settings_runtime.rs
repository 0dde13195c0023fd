//! The router settings the operator writes to etcd are the ones the agents
//! read: the operator's JSON deserializes into the runtime's
//! `RouterSettings` with every value intact, defaults included. No cluster.

use xpyd_operator::crd::{RouterSpec, RouterStrategy};
use xpyd_operator::router_settings::RouterSettings;
use xpyd_runtime::discovery as runtime;

fn read_by_agent(settings: &RouterSettings) -> runtime::RouterSettings {
    let json = serde_json::to_vec(settings).expect("encodes");
    serde_json::from_slice(&json).expect("the runtime reads what the operator writes")
}

#[test]
fn an_agent_reads_every_value_the_operator_writes() {
    let spec = RouterSpec {
        strategy: RouterStrategy::Session,
        max_local_prefill_length: 300,
        session_header: "x-user".to_string(),
        max_prefill_queue_depth: 7,
        kv_overlap_weight: 2.5,
        kv_load_weight: 0.25,
    };
    let got = read_by_agent(&RouterSettings::new(&spec, 2, 11));
    assert_eq!(
        got,
        runtime::RouterSettings {
            generation: 11,
            strategy: runtime::RouterStrategy::Session,
            max_local_prefill_length: 300,
            session_header: "x-user".to_string(),
            max_prefill_queue_depth: 7,
            disaggregated: true,
            kv_overlap_weight: 2.5,
            kv_load_weight: 0.25,
        }
    );
}

#[test]
fn operator_and_runtime_defaults_agree() {
    let got = read_by_agent(&RouterSettings::new(&RouterSpec::default(), 1, 0));
    assert_eq!(got, runtime::RouterSettings::default());

    for (operator, agent) in [
        (RouterStrategy::Kv, runtime::RouterStrategy::Kv),
        (
            RouterStrategy::RoundRobin,
            runtime::RouterStrategy::RoundRobin,
        ),
        (RouterStrategy::Random, runtime::RouterStrategy::Random),
        (RouterStrategy::Session, runtime::RouterStrategy::Session),
    ] {
        let spec = RouterSpec {
            strategy: operator,
            ..RouterSpec::default()
        };
        assert_eq!(
            read_by_agent(&RouterSettings::new(&spec, 0, 1)).strategy,
            agent
        );
    }
}

#[test]
fn a_spec_without_the_new_fields_gets_the_defaults() {
    let spec: RouterSpec = serde_json::from_str(r#"{"strategy":"kv"}"#).expect("parses");
    assert_eq!(spec.session_header, "session-id");
    assert_eq!((spec.kv_overlap_weight, spec.kv_load_weight), (1.0, 1.0));
}

//! The NATS bus against a real nats-server with JetStream: request streams
//! (order, end, no responders, a responder process killed, cancellation),
//! the prefill work queue (one delivery per job across workers, redelivery
//! after a worker dies, depth), KV events, and all of it after the server is
//! killed and restarted on the same store.
//!
//! Processes that must die for real are this test binary run again with
//! `XPYD_BUS_CHILD` set: it then runs only `child_process_entry` (a no-op
//! otherwise) and reports over stdout lines tagged `XPYD:`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::timeout;
use xpyd_e2e::child::ChildProcess;
use xpyd_e2e::{Nats, Tools, Workdir};
use xpyd_runtime::bus::{Bus, BusError, Bytes, NatsBus, NatsOptions};
use xpyd_runtime::discovery::Scope;

/// Generous: the machine running the tests is shared and loaded.
const DEADLINE: Duration = Duration::from_secs(20);
/// Three heartbeat intervals (the default heartbeat is 1 s).
const IDLE: Duration = Duration::from_secs(3);

const CHILD_ENV: &str = "XPYD_BUS_CHILD";
const URL_ENV: &str = "XPYD_BUS_URL";
const DEPLOYMENT_ENV: &str = "XPYD_BUS_DEPLOYMENT";

fn options() -> NatsOptions {
    NatsOptions {
        prefill_ack_wait: Duration::from_secs(2),
        // Short, and not a divisor of the ack wait (see `Puller` in the
        // NATS bus).
        prefill_pull_expiry: Duration::from_millis(1300),
        ..NatsOptions::default()
    }
}

fn scope(deployment: &str) -> Scope {
    Scope::new("e2e", deployment)
}

async fn connect(nats_url: &str, deployment: &str) -> Arc<NatsBus> {
    NatsBus::connect(nats_url, scope(deployment), options())
        .await
        .unwrap()
}

async fn start_nats(name: &str) -> (Workdir, Nats) {
    let tools = Tools::locate().unwrap();
    let dir = Workdir::new(name).unwrap();
    let nats = Nats::start(&tools, dir.path()).await.unwrap();
    (dir, nats)
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    match timeout(DEADLINE, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {DEADLINE:?}"),
    }
}

// ---------------------------------------------------------------- child

/// This test binary again, as the bus client `role`.
fn spawn_child(role: &str, nats_url: &str, deployment: &str) -> ChildProcess {
    ChildProcess::spawn(
        "child_process_entry",
        [
            (CHILD_ENV, role),
            (URL_ENV, nats_url),
            (DEPLOYMENT_ENV, deployment),
        ],
    )
}

async fn expect(child: &mut ChildProcess, want: &str) {
    let got = child
        .line(DEADLINE)
        .await
        .unwrap_or_else(|e| panic!("{want}: {e}"));
    assert_eq!(got, want);
}

#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    let url = std::env::var(URL_ENV).unwrap();
    let deployment = std::env::var(DEPLOYMENT_ENV).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let bus = connect(&url, &deployment).await;
        match role.as_str() {
            // Serves `child`, answers one response, never ends.
            "responder" => {
                let mut requests = bus.serve("child").await.unwrap();
                println!("XPYD:SERVING");
                let mut req = requests.next().await.unwrap();
                req.responder
                    .send(Bytes::from_static(b"first"))
                    .await
                    .unwrap();
                println!("XPYD:SENT");
                std::future::pending::<()>().await;
            }
            // Sends one request to `decode-0`, reads one response, waits.
            "requester" => {
                let mut stream = bus.request("decode-0", Bytes::new(), IDLE).await.unwrap();
                let first = stream.next().await;
                assert!(matches!(first, Some(Ok(_))), "{first:?}");
                println!("XPYD:RECEIVED");
                std::future::pending::<()>().await;
            }
            // Takes one prefill job and sits on it.
            "worker" => {
                let mut jobs = bus.prefill_jobs("").await.unwrap();
                println!("XPYD:READY");
                let job = jobs.next().await.unwrap();
                println!(
                    "XPYD:TOOK {} {}",
                    String::from_utf8_lossy(&job.payload),
                    job.delivered
                );
                std::future::pending::<()>().await;
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

// ---------------------------------------------------------------- requests

#[tokio::test]
async fn a_streamed_request_returns_every_response_in_order_then_ends() {
    let (_dir, nats) = start_nats("bus-stream").await;
    let server = connect(&nats.url(), "stream").await;
    let client = connect(&nats.url(), "stream").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let serving = tokio::spawn(async move {
        let mut req = requests.next().await.unwrap();
        let n: u32 = String::from_utf8_lossy(&req.payload).parse().unwrap();
        for i in 0..n {
            req.responder
                .send(Bytes::from(format!("tok{i}")))
                .await
                .unwrap();
        }
        req.responder.end().await.unwrap();
    });
    let stream = client
        .request("decode-0", Bytes::from_static(b"500"), IDLE)
        .await
        .unwrap();
    let got: Vec<_> = within("responses", stream.collect::<Vec<_>>()).await;
    let want: Vec<_> = (0..500)
        .map(|i| Ok(Bytes::from(format!("tok{i}"))))
        .collect();
    assert_eq!(got, want);
    within("server task", serving).await.unwrap();
}

#[tokio::test]
async fn an_unknown_instance_answers_no_responders_fast() {
    let (_dir, nats) = start_nats("bus-noresp").await;
    let client = connect(&nats.url(), "noresp").await;
    let idle = Duration::from_secs(10);
    let started = Instant::now();
    let err = within(
        "no responders",
        client.request("nobody", Bytes::new(), idle),
    )
    .await
    .err();
    assert_eq!(err, Some(BusError::NoResponders("nobody".into())));
    assert!(started.elapsed() < idle / 2, "took {:?}", started.elapsed());

    // An instance that stopped serving is just as unknown.
    let server = connect(&nats.url(), "noresp").await;
    let requests = server.serve("gone").await.unwrap();
    drop(requests);
    within("no responders after stop", async {
        loop {
            // Until the unsubscribe reaches the server, a request may still
            // be routed to the stopped process and time out.
            match client
                .request("gone", Bytes::new(), Duration::from_secs(1))
                .await
            {
                Err(BusError::NoResponders(id)) => return assert_eq!(id, "gone"),
                Err(BusError::Timeout(_)) => {}
                other => panic!("unexpected {:?}", other.map(|_| "a stream")),
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_responder_process_killed_mid_stream_times_out_within_the_idle_timeout() {
    let (_dir, nats) = start_nats("bus-killed").await;
    let mut child = spawn_child("responder", &nats.url(), "killed");
    expect(&mut child, "SERVING").await;
    let client = connect(&nats.url(), "killed").await;
    let mut stream = within("request", client.request("child", Bytes::new(), IDLE))
        .await
        .unwrap();
    let first = within("first response", stream.next()).await;
    assert_eq!(first, Some(Ok(Bytes::from_static(b"first"))));
    expect(&mut child, "SENT").await;
    child.kill();
    let killed_at = Instant::now();
    let next = within("timeout", stream.next()).await;
    assert_eq!(next, Some(Err(BusError::Timeout(IDLE))));
    // Heartbeats stop with the process: noticed within the idle timeout
    // (plus the heartbeat that may have just left).
    assert!(
        killed_at.elapsed() < IDLE + Duration::from_secs(2),
        "took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(within("end", stream.next()).await, None);
}

#[tokio::test]
async fn a_responder_dropped_without_end_is_reported_abandoned() {
    let (_dir, nats) = start_nats("bus-abandon").await;
    let server = connect(&nats.url(), "abandon").await;
    let client = connect(&nats.url(), "abandon").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let mut stream = client
        .request("decode-0", Bytes::new(), IDLE)
        .await
        .unwrap();
    let mut req = within("request", requests.next()).await.unwrap();
    req.responder.send(Bytes::from_static(b"a")).await.unwrap();
    drop(req);
    assert_eq!(
        within("data", stream.next()).await,
        Some(Ok(Bytes::from_static(b"a")))
    );
    assert_eq!(
        within("abandoned", stream.next()).await,
        Some(Err(BusError::Abandoned))
    );
    assert_eq!(within("end", stream.next()).await, None);
}

#[tokio::test]
async fn dropping_the_response_stream_cancels_the_request_on_the_server() {
    let (_dir, nats) = start_nats("bus-cancel").await;
    let server = connect(&nats.url(), "cancel").await;
    let client = connect(&nats.url(), "cancel").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let mut stream = client
        .request("decode-0", Bytes::new(), IDLE)
        .await
        .unwrap();
    let mut req = within("request", requests.next()).await.unwrap();
    req.responder.send(Bytes::from_static(b"a")).await.unwrap();
    assert_eq!(
        within("data", stream.next()).await,
        Some(Ok(Bytes::from_static(b"a")))
    );
    let cancelled = req.responder.cancelled();
    let dropped_at = Instant::now();
    drop(stream);
    within("cancelled", cancelled).await;
    eprintln!("cancel reached the server in {:?}", dropped_at.elapsed());
    assert_eq!(
        req.responder.send(Bytes::from_static(b"b")).await,
        Err(BusError::Cancelled)
    );
}

#[tokio::test]
async fn a_requester_process_killed_mid_stream_cancels_the_request_on_the_server() {
    let (_dir, nats) = start_nats("bus-reqkilled").await;
    let server = connect(&nats.url(), "reqkilled").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let mut child = spawn_child("requester", &nats.url(), "reqkilled");
    let mut req = within("request", requests.next()).await.unwrap();
    req.responder.send(Bytes::from_static(b"a")).await.unwrap();
    expect(&mut child, "RECEIVED").await;
    let mut cancelled = req.responder.cancelled();
    // Heartbeats to a live requester cancel nothing.
    assert!(
        timeout(Duration::from_millis(2500), &mut cancelled)
            .await
            .is_err(),
        "cancelled while the requester lives"
    );
    child.kill();
    let killed_at = Instant::now();
    // No cancel message was sent: the bus notices from its heartbeats.
    within("cancelled", cancelled).await;
    eprintln!(
        "a killed requester was noticed in {:?}",
        killed_at.elapsed()
    );
    assert_eq!(
        req.responder.send(Bytes::from_static(b"b")).await,
        Err(BusError::Cancelled)
    );
}

// ---------------------------------------------------------------- prefill queue

/// Each KV layout has its own prefill queue: a job reaches only the
/// workers of its layout, and depths are counted per queue.
#[tokio::test]
async fn prefill_queues_of_different_kv_layouts_are_separate() {
    let (_dir, nats) = start_nats("bus-queues").await;
    let decode = connect(&nats.url(), "queues").await;
    decode
        .enqueue_prefill("layout-a", Bytes::from_static(b"for-a"))
        .await
        .unwrap();
    assert_eq!(decode.prefill_queue_depth("layout-a").await.unwrap(), 1);
    assert_eq!(decode.prefill_queue_depth("layout-b").await.unwrap(), 0);
    let worker = connect(&nats.url(), "queues").await;
    let mut b = worker.prefill_jobs("layout-b").await.unwrap();
    assert!(
        timeout(Duration::from_secs(2), b.next()).await.is_err(),
        "a job of another layout reached a worker of layout b"
    );
    let mut a = worker.prefill_jobs("layout-a").await.unwrap();
    let job = within("the job of layout a", a.next()).await.unwrap();
    assert_eq!(job.payload, Bytes::from_static(b"for-a"));
    job.ack().await.unwrap();
    assert_eq!(decode.prefill_queue_depth("layout-a").await.unwrap(), 0);
}

#[tokio::test]
async fn prefill_jobs_reach_one_worker_each_and_depth_counts_waiting_jobs() {
    let (_dir, nats) = start_nats("bus-queue").await;
    let frontend = connect(&nats.url(), "queue").await;
    assert_eq!(frontend.prefill_queue_depth("").await.unwrap(), 0);
    for i in 0..10 {
        frontend
            .enqueue_prefill("", Bytes::from(format!("job{i}")))
            .await
            .unwrap();
    }
    assert_eq!(frontend.prefill_queue_depth("").await.unwrap(), 10);

    let (tx, mut done) = mpsc::unbounded_channel();
    let mut workers = Vec::new();
    for w in 0..2 {
        let bus = connect(&nats.url(), "queue").await;
        let tx = tx.clone();
        workers.push(tokio::spawn(async move {
            let mut jobs = bus.prefill_jobs("").await.unwrap();
            while let Some(job) = jobs.next().await {
                assert_eq!(job.delivered, 1);
                // Busy for a while: the other worker must get the next jobs.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let payload = job.payload.clone();
                job.ack().await.unwrap();
                if tx.send((w, payload)).is_err() {
                    break;
                }
            }
        }));
    }
    let mut seen = BTreeSet::new();
    let mut per_worker = [0; 2];
    for _ in 0..10 {
        let (w, payload) = within("job", done.recv()).await.unwrap();
        assert!(seen.insert(payload.clone()), "{payload:?} delivered twice");
        per_worker[w] += 1;
    }
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    assert_eq!(frontend.prefill_queue_depth("").await.unwrap(), 0);
    // Nothing is delivered twice later either (the ack wait is 2 s).
    assert!(
        timeout(Duration::from_secs(3), done.recv()).await.is_err(),
        "a job came back after its ack"
    );
    for w in workers {
        w.abort();
    }
}

#[tokio::test]
async fn a_job_dropped_nacked_or_held_by_a_killed_worker_is_redelivered() {
    let (_dir, nats) = start_nats("bus-redeliver").await;
    let frontend = connect(&nats.url(), "redeliver").await;

    // Dropped without ack: back after the ack wait (2 s), delivered twice.
    let worker = connect(&nats.url(), "redeliver").await;
    let mut jobs = worker.prefill_jobs("").await.unwrap();
    frontend
        .enqueue_prefill("", Bytes::from_static(b"dropped"))
        .await
        .unwrap();
    let job = within("job", jobs.next()).await.unwrap();
    assert_eq!((&job.payload[..], job.delivered), (&b"dropped"[..], 1));
    drop(job);
    let dropped_at = Instant::now();
    let job = within("redelivery", jobs.next()).await.unwrap();
    assert_eq!((&job.payload[..], job.delivered), (&b"dropped"[..], 2));
    assert!(dropped_at.elapsed() >= Duration::from_millis(1500));
    // A nak gives it back at once.
    job.nak().await.unwrap();
    let job = within("after nak", jobs.next()).await.unwrap();
    assert_eq!((&job.payload[..], job.delivered), (&b"dropped"[..], 3));
    job.ack().await.unwrap();
    drop(jobs);

    // Taken by a worker process that is then SIGKILLed.
    let mut child = spawn_child("worker", &nats.url(), "redeliver");
    expect(&mut child, "READY").await;
    frontend
        .enqueue_prefill("", Bytes::from_static(b"orphan"))
        .await
        .unwrap();
    expect(&mut child, "TOOK orphan 1").await;
    assert_eq!(frontend.prefill_queue_depth("").await.unwrap(), 0);
    child.kill();
    let mut jobs = worker.prefill_jobs("").await.unwrap();
    let job = within("redelivery", jobs.next()).await.unwrap();
    assert_eq!((&job.payload[..], job.delivered), (&b"orphan"[..], 2));
    job.ack().await.unwrap();
}

// ---------------------------------------------------------------- KV events

#[tokio::test]
async fn kv_events_from_two_publishers_reach_a_subscriber_with_their_ids() {
    let (_dir, nats) = start_nats("bus-kv").await;
    let router = connect(&nats.url(), "kv").await;
    let mut events = router.kv_events().await.unwrap();
    let decode = connect(&nats.url(), "kv").await;
    let prefill = connect(&nats.url(), "kv").await;
    // An id with a dot: the subject token is sanitized, the id is not.
    decode
        .publish_kv_events("decode-0.a", Bytes::from_static(b"d"))
        .await
        .unwrap();
    prefill
        .publish_kv_events("prefill-0", Bytes::from_static(b"p"))
        .await
        .unwrap();
    let mut got: Vec<_> = within("events", (&mut events).take(2).collect::<Vec<_>>()).await;
    got.sort();
    assert_eq!(
        got,
        vec![
            ("decode-0.a".to_string(), Bytes::from_static(b"d")),
            ("prefill-0".to_string(), Bytes::from_static(b"p")),
        ]
    );
    // Another deployment's events stay out.
    let other = connect(&nats.url(), "other").await;
    other
        .publish_kv_events("x", Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert!(
        timeout(Duration::from_millis(500), events.next())
            .await
            .is_err()
    );
}

// ---------------------------------------------------------------- restart

#[tokio::test]
async fn everything_works_again_after_nats_is_killed_and_restarted() {
    let (_dir, mut nats) = start_nats("bus-restart").await;
    let server = connect(&nats.url(), "restart").await;
    let client = connect(&nats.url(), "restart").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let mut events = client.kv_events().await.unwrap();
    let mut jobs = server.prefill_jobs("").await.unwrap();
    // A job left on the queue across the restart (file storage).
    client
        .enqueue_prefill("", Bytes::from_static(b"before"))
        .await
        .unwrap();
    let serving = tokio::spawn(async move {
        while let Some(mut req) = requests.next().await {
            let payload = req.payload.clone();
            if req.responder.send(payload).await.is_ok() {
                let _ = req.responder.end().await;
            }
        }
    });

    nats.kill();
    nats.restart().await.unwrap();

    // Requests: retried until the clients are back and re-subscribed.
    let got = within("request after restart", async {
        loop {
            match client
                .request("decode-0", Bytes::from_static(b"ping"), IDLE)
                .await
            {
                Ok(stream) => {
                    let got: Vec<_> = stream.collect().await;
                    if got == vec![Ok(Bytes::from_static(b"ping"))] {
                        return got;
                    }
                }
                Err(e) => eprintln!("request after restart: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(got.len(), 1);

    // Queue: the stored job, then a new one, through the same stream.
    let job = within("stored job", jobs.next()).await.unwrap();
    assert_eq!(&job.payload[..], b"before");
    job.ack().await.unwrap();
    within("enqueue after restart", async {
        loop {
            match client
                .enqueue_prefill("", Bytes::from_static(b"after"))
                .await
            {
                Ok(()) => return,
                Err(e) => eprintln!("enqueue after restart: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let job = within("new job", jobs.next()).await.unwrap();
    assert_eq!((&job.payload[..], job.delivered), (&b"after"[..], 1));
    job.ack().await.unwrap();
    assert_eq!(client.prefill_queue_depth("").await.unwrap(), 0);

    // KV events: published until the resubscribed router sees one.
    let (instance, payload) = within("kv event after restart", async {
        loop {
            server
                .publish_kv_events("decode-0", Bytes::from_static(b"kv"))
                .await
                .unwrap();
            if let Ok(Some(event)) = timeout(Duration::from_millis(200), events.next()).await {
                return event;
            }
        }
    })
    .await;
    assert_eq!((instance.as_str(), &payload[..]), ("decode-0", &b"kv"[..]));
    serving.abort();
}

// ---------------------------------------------------------------- numbers

/// Not an assertion on speed: prints the request round trip and the
/// per-token latency over this machine's loopback NATS (run with
/// `--nocapture` to read them).
#[tokio::test]
async fn request_round_trip_and_token_latency() {
    let (_dir, nats) = start_nats("bus-latency").await;
    let server = connect(&nats.url(), "latency").await;
    let client = connect(&nats.url(), "latency").await;
    let mut requests = server.serve("decode-0").await.unwrap();
    let serving = tokio::spawn(async move {
        while let Some(mut req) = requests.next().await {
            // "<count> <pause ms>"
            let ask = String::from_utf8_lossy(&req.payload).to_string();
            let mut ask = ask.split(' ').map(|v| v.parse::<u64>().unwrap_or(0));
            let n = ask.next().unwrap_or(1);
            let pause = Duration::from_millis(ask.next().unwrap_or(0));
            for _ in 0..n {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
                let nanos = now.as_nanos() as u64;
                if req
                    .responder
                    .send(Bytes::copy_from_slice(&nanos.to_be_bytes()))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = req.responder.end().await;
        }
    });

    let mut round_trips = Vec::new();
    for _ in 0..200 {
        let started = Instant::now();
        let stream = client
            .request("decode-0", Bytes::from_static(b"1"), IDLE)
            .await
            .unwrap();
        let got: Vec<_> = within("round trip", stream.collect::<Vec<_>>()).await;
        round_trips.push(started.elapsed());
        assert_eq!(got.len(), 1);
    }

    // Each token's trip from `send` to the requester's `next`.
    let token_latency = async |ask: &'static str| {
        let mut latency = Vec::new();
        let started = Instant::now();
        let mut stream = client
            .request("decode-0", Bytes::from_static(ask.as_bytes()), IDLE)
            .await
            .unwrap();
        while let Some(item) = within("token", stream.next()).await {
            let sent = u64::from_be_bytes(item.unwrap()[..8].try_into().unwrap());
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64;
            latency.push(Duration::from_nanos(now.saturating_sub(sent)));
        }
        (latency, started.elapsed())
    };
    // Paced like a decoder (one token every 5 ms), then a burst.
    let (mut paced, _) = token_latency("300 5").await;
    let (mut burst, burst_time) = token_latency("2000").await;
    assert_eq!((paced.len(), burst.len()), (300, 2000));

    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * p) as usize]
    };
    eprintln!(
        "request round trip (1 response + end), n=200: p50 {:?} p99 {:?}",
        pct(&mut round_trips, 0.5),
        pct(&mut round_trips, 0.99)
    );
    eprintln!(
        "token latency, paced 5 ms, n=300: p50 {:?} p99 {:?}",
        pct(&mut paced, 0.5),
        pct(&mut paced, 0.99)
    );
    eprintln!(
        "token latency, burst, n=2000: p50 {:?} p99 {:?}; all streamed in {:?}",
        pct(&mut burst, 0.5),
        pct(&mut burst, 0.99),
        burst_time
    );
    serving.abort();
}

//! Each example runs here on the memory backend, on tokio's paused clock (a lease expiry takes no
//! wall time), and the timeline it told is checked: a broken example fails CI. With the feature
//! `etcd-tests` (which `scripts/test.sh` turns on), each also runs on a real, throwaway etcd
//! (`locker_etcd::testing`), in real time, and is checked the same way.

use std::time::Duration;

use locker_examples::{Line, Store, Timeline};
use tokio::time::timeout;

#[path = "../examples/name_server.rs"]
#[allow(dead_code)] // its `main`: the tests call `run`
mod name_server;

#[path = "../examples/health_mesh.rs"]
#[allow(dead_code)] // its `main`: the tests call `run`
mod health_mesh;

#[path = "../examples/leader_worker.rs"]
#[allow(dead_code)] // its `main`: the tests call `run`
mod leader_worker;

/// A bound on a run, in the paused clock's time: an example that gets stuck fails at once instead
/// of hanging the test.
const BOUND: Duration = Duration::from_secs(600);

#[tokio::test(start_paused = true)]
async fn name_server_take_over_is_seen_by_the_resolver() {
    check_name_server(&Store::memory()).await;
}

#[tokio::test(start_paused = true)]
async fn health_mesh_dependants_react_to_the_outage_and_the_recovery() {
    check_health_mesh(&Store::memory()).await;
}

#[tokio::test(start_paused = true)]
async fn leader_worker_takes_over_and_the_ledger_refuses_the_killed_leaders_late_write() {
    check_leader_worker(&Store::memory()).await;
}

/// The same runs on a real etcd.
#[cfg(feature = "etcd-tests")]
mod on_etcd {
    use locker_etcd::testing::{EtcdServer, unique_prefix};
    use locker_examples::Store;

    /// The etcd of this test binary, with keys under a prefix of the test's own.
    async fn etcd(test: &str) -> Store {
        let etcd = EtcdServer::shared().await.unwrap_or_else(|e| panic!("{e}"));
        Store::Etcd {
            endpoints: etcd.endpoints(),
            prefix: format!("locker-test/{}", unique_prefix(test)),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn name_server_take_over_is_seen_by_the_resolver() {
        super::check_name_server(&etcd("name-server").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn health_mesh_dependants_react_to_the_outage_and_the_recovery() {
        super::check_health_mesh(&etcd("health-mesh").await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn leader_worker_takes_over_and_the_ledger_refuses_the_killed_leaders_late_write() {
        super::check_leader_worker(&etcd("leader-worker").await).await;
    }
}

/// Runs the name server on `store` and checks its timeline.
async fn check_name_server(store: &Store) {
    let t = Timeline::start();
    let ran = timeout(BOUND, name_server::run(store, &t)).await;
    let lines = t.lines();
    assert!(
        matches!(ran, Ok(Ok(()))),
        "the example failed or got stuck: {ran:?}\n{}",
        show(&lines)
    );

    // The resolver followed every change, and only those: nobody, host-a, host-b, nobody.
    let resolver = said_by(&lines, "resolver");
    assert_eq!(resolver.len(), 4, "{}", show(&lines));
    assert_eq!(resolver[0], "www.example.com -> nobody");
    assert!(resolver[1].starts_with("www.example.com -> 10.1.1.1 (fencing token "));
    assert!(resolver[2].starts_with("www.example.com -> 10.1.1.2 (fencing token "));
    assert_eq!(resolver[3], "www.example.com -> nobody");

    // host-a owned first; host-b waited, then owned only after host-a died.
    let owns_a = find(
        &lines,
        "host-a",
        "owns www.example.com with 10.1.1.1 (token ",
    );
    let waiting_b = find(&lines, "host-b", "waiting: 10.1.1.1 holds the record");
    let get = find(&lines, "client", "get(www.example.com) = 10.1.1.1");
    let dies_a = find(&lines, "host-a", "dies");
    let took_over_b = find(&lines, "host-b", "took over www.example.com (token ");
    let resolved_b = find(&lines, "resolver", "www.example.com -> 10.1.1.2");
    assert!(
        owns_a < waiting_b && waiting_b < get && get < dies_a && dies_a < took_over_b,
        "{}",
        show(&lines)
    );
    assert!(dies_a < resolved_b, "{}", show(&lines));

    // host-b's fencing token is larger than host-a's, and the resolver was told the same ones.
    let token_a = number_after(&lines[owns_a].what, "(token ");
    let token_b = number_after(&lines[took_over_b].what, "(token ");
    assert!(token_b > token_a, "{}", show(&lines));
    assert_eq!(number_after(resolver[1], "fencing token "), token_a);
    assert_eq!(number_after(resolver[2], "fencing token "), token_b);

    let last = lines.last().map(ToString::to_string);
    assert_eq!(
        last.as_deref(),
        Some("done       the resolver followed every change")
    );
}

/// Runs the health mesh on `store` and checks its timeline.
async fn check_health_mesh(store: &Store) {
    let t = Timeline::start();
    let ran = timeout(BOUND, health_mesh::run(store, &t)).await;
    let lines = t.lines();
    assert!(
        matches!(ran, Ok(Ok(()))),
        "the example failed or got stuck: {ran:?}\n{}",
        show(&lines)
    );

    let unhealthy = find(&lines, "service-b", "becomes unhealthy");
    let recovers = find(&lines, "service-b", "recovers");
    let done = find(&lines, "done", "both dependants reacted");
    assert!(unhealthy < recovers && recovers < done, "{}", show(&lines));
    assert_eq!(done, lines.len() - 1, "{}", show(&lines));

    // Before the outage: each dependant sees each of its dependencies healthy, once.
    let mut before = sightings(&lines[..unhealthy]);
    before.sort();
    assert_eq!(
        before,
        [
            ("service-a", "service-b", true),
            ("service-a", "service-c", true),
            ("service-c", "service-b", true),
        ],
        "{}",
        show(&lines)
    );

    // The outage: both dependants of service-b see it go; service-c goes dark with it, and
    // service-a sees that too.
    let mut outage = sightings(&lines[unhealthy..recovers]);
    outage.sort();
    assert_eq!(
        outage,
        [
            ("service-a", "service-b", false),
            ("service-a", "service-c", false),
            ("service-c", "service-b", false),
        ],
        "{}",
        show(&lines)
    );
    let c_sees_b_go = find(&lines, "service-c", "sees service-b OFFLINE");
    let c_goes_dark = find(&lines, "service-c", "cannot work without service-b");
    let a_sees_c_go = find(&lines, "service-a", "sees service-c OFFLINE");
    assert!(
        c_sees_b_go < c_goes_dark && c_goes_dark < a_sees_c_go,
        "{}",
        show(&lines)
    );

    // The recovery: both dependants see service-b back; service-c stays dark.
    let mut after = sightings(&lines[recovers..done]);
    after.sort();
    assert_eq!(
        after,
        [
            ("service-a", "service-b", true),
            ("service-c", "service-b", true),
        ],
        "{}",
        show(&lines)
    );
}

/// Runs the leader worker on `store` and checks its timeline.
async fn check_leader_worker(store: &Store) {
    let t = Timeline::start();
    let ran = timeout(BOUND, leader_worker::run(store, &t)).await;
    let lines = t.lines();
    assert!(
        matches!(ran, Ok(Ok(()))),
        "the example failed or got stuck: {ran:?}\n{}",
        show(&lines)
    );
    let leads: Vec<(usize, &str, i64)> = lines
        .iter()
        .enumerate()
        .filter(|(_, line)| line.what.starts_with("leads workers/ledger (token "))
        .map(|(i, line)| (i, line.who.as_str(), number_after(&line.what, "(token ")))
        .collect();
    assert_eq!(leads.len(), 2, "one take-over: {}", show(&lines));
    let ((_, first, first_token), (took_over, next, next_token)) = (leads[0], leads[1]);
    assert_ne!(first, next, "{}", show(&lines));
    assert!(next_token > first_token, "{}", show(&lines));
    let killed = find(&lines, first, "is killed");
    assert!(killed < took_over, "{}", show(&lines));
    // The new leader registered with the ledger before anything else of its term.
    let registered = find(
        &lines,
        "ledger",
        &format!("{next} registered token {next_token}"),
    );
    // The killed leader's write in flight was refused after that, naming both tokens; nothing of
    // it was accepted once the new leader had registered.
    let refused = find(&lines, "ledger", "refused job-");
    assert!(registered < refused, "{}", show(&lines));
    assert!(
        lines[refused].what.contains(&format!(
            "of {first}: fenced off: token {first_token} is below {next_token}"
        )),
        "{}",
        show(&lines)
    );
    let accepted_late = lines[registered..].iter().any(|line| {
        line.who == "ledger"
            && line.what.starts_with("accepted")
            && line.what.contains(&format!("of {first} "))
    });
    assert!(!accepted_late, "{}", show(&lines));
    let accepted_next = lines[registered..].iter().any(|line| {
        line.who == "ledger"
            && line.what == format!("accepted job-1 of {next} (token {next_token})")
    });
    assert!(accepted_next, "{}", show(&lines));
    let last = lines.last().map(|line| line.who.as_str());
    assert_eq!(last, Some("done"), "{}", show(&lines));
}

/// What `who` said, in order.
fn said_by<'a>(lines: &'a [Line], who: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter(|line| line.who == who)
        .map(|line| line.what.as_str())
        .collect()
}

/// The index of the first line where `who` says something starting with `what`.
fn find(lines: &[Line], who: &str, what: &str) -> usize {
    lines
        .iter()
        .position(|line| line.who == who && line.what.starts_with(what))
        .unwrap_or_else(|| panic!("no line {who:?} {what:?} in\n{}", show(lines)))
}

/// The health changes seen in `lines`: (watcher, service, healthy), from lines such as
/// `service-a  sees service-b OFFLINE: stops calling it`.
fn sightings(lines: &[Line]) -> Vec<(&str, &str, bool)> {
    lines
        .iter()
        .filter_map(|line| {
            let (service, health) = line.what.strip_prefix("sees ")?.split_once(' ')?;
            let healthy = health.starts_with("healthy");
            assert!(healthy || health.starts_with("OFFLINE"), "{line}");
            Some((line.who.as_str(), service, healthy))
        })
        .collect()
}

/// The number right after `label` in `text`, e.g. 3 in `took over www.example.com (token 3 > 2)`.
fn number_after(text: &str, label: &str) -> i64 {
    text.split_once(label)
        .and_then(|(_, rest)| {
            let digits = rest.split(|c: char| !c.is_ascii_digit()).next()?;
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no number after {label:?} in {text:?}"))
}

/// The timeline, one line each, for failure messages.
fn show(lines: &[Line]) -> String {
    lines.iter().map(|line| format!("{line}\n")).collect()
}

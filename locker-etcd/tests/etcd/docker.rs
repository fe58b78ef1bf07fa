//! locker on an etcd in a Docker container, started through `testcontainers`.
//!
//! The image is `LOCKER_ETCD_IMAGE`; without it the test builds one from the local etcd binary
//! with `scripts/etcd-image.sh` (no registry needed). Without a reachable Docker engine the test
//! fails: it never passes by skipping.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use locker_core::{Locker, Ownership};
use locker_etcd::EtcdBackend;
use locker_etcd::testing::{EtcdServer, unique_prefix};

/// `LOCKER_ETCD_IMAGE`, else the tag `scripts/etcd-image.sh` prints after building the image.
fn image() -> String {
    if let Ok(image) = std::env::var("LOCKER_ETCD_IMAGE") {
        return image;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/etcd-image.sh");
    let output = Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
    assert!(
        output.status.success(),
        "LOCKER_ETCD_IMAGE is unset and {} could not build a local etcd image ({}); this test \
         needs Docker and an etcd binary (or set LOCKER_ETCD_IMAGE):\n{}",
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .unwrap_or_else(|| panic!("{} printed no tag", script.display()))
        .to_owned()
}

fn container_exists(id: &str) -> bool {
    let output = Command::new("docker")
        .args(["ps", "--all", "--quiet", "--no-trunc", "--filter"])
        .arg(format!("id={id}"))
        .output()
        .expect("docker ps");
    assert!(output.status.success(), "docker ps failed: {output:?}");
    !String::from_utf8_lossy(&output.stdout).trim().is_empty()
}

async fn backend(endpoints: Vec<String>, prefix: &str) -> EtcdBackend {
    EtcdBackend::builder()
        .endpoints(endpoints)
        .prefix(prefix)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a backend on the container's etcd")
}

#[tokio::test]
async fn lock_hand_off_on_etcd_in_docker() {
    let image = image();
    let etcd = EtcdServer::start_docker(&image).await.unwrap_or_else(|err| {
        panic!(
            "this test needs a reachable Docker engine (DOCKER_HOST or /var/run/docker.sock) and \
             the image {image}:\n{err}"
        )
    });
    let id = etcd.container_id().expect("a container").to_owned();
    eprintln!("using the {}", etcd.describe());

    let prefix = unique_prefix("docker-hand-off");
    let a = Locker::new(backend(etcd.endpoints(), &prefix).await);
    let b = Locker::new(backend(etcd.endpoints(), &prefix).await);
    let key = "www.example.com";

    let guard = a.acquire(key, "10.1.1.1").await.unwrap();
    let first = guard.token();
    let held = b.get(key).await.unwrap().expect("held by A");
    assert_eq!(held.value_str(), Some("10.1.1.1"));
    assert_eq!(held.token, first);

    let handle = b.lock(key, "10.2.2.2").await.unwrap();
    let waiter = tokio::spawn(async move {
        let token = handle.wait_owned().await;
        (handle, token)
    });
    // B queues behind A and does not own while A holds.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "B owns while A holds the lock");
    assert!(guard.is_owned());

    guard.release().await.unwrap();
    let (handle, second) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("B owns within 10 s of A's release")
        .unwrap();
    let second = second.unwrap();
    assert!(
        second > first,
        "fencing tokens grow: {second:?} after {first:?}"
    );
    assert!(handle.is_owned());
    assert_eq!(handle.ownership(), Ownership::Owned { token: second });
    let holder = a.get(key).await.unwrap().expect("held by B");
    assert_eq!(holder.value_str(), Some("10.2.2.2"));
    assert_eq!(holder.token, second);

    handle.release().await.unwrap();
    assert_eq!(a.get(key).await.unwrap(), None);
    a.close().await;
    b.close().await;

    assert!(container_exists(&id));
    drop(etcd);
    assert!(
        !container_exists(&id),
        "container {id} is still there after the target was dropped"
    );
}

//! Snapshots: save from one cluster, restore into a fresh one.

use serde_json::json;

use crate::harness::{Cluster, SOON, eventually};

/// What this test does:
/// - fills a cluster with KV entries and a catalog registration and saves a snapshot,
/// - checks a corrupted copy is refused,
/// - restores the snapshot into a brand-new cluster and finds the same data there.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_saved_from_one_cluster_restores_into_a_fresh_one() {
    let a = Cluster::start(1).await;
    let base = a.servers[0].http();
    for i in 0..20 {
        a.put(&format!("{base}/v1/kv/snap/{i}"), format!("value {i}")).await.unwrap();
    }
    let reg = json!({"Node": "db1", "Address": "10.2.2.2", "Service": {"Service": "db", "Port": 5432}});
    a.put(&format!("{base}/v1/catalog/register"), reg.to_string()).await.unwrap();
    let resp = a.http.get(format!("{base}/v1/snapshot")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-consul-index"));
    let archive = resp.bytes().await.unwrap().to_vec();

    let b = Cluster::start(3).await;
    let bbase = b.servers[1].http();
    // Corrupt the stored data itself (a value inside state.bin), not tar padding.
    let mut bad = archive.clone();
    let at = bad.windows(8).position(|w| w == b"value 19").expect("value inside the archive");
    bad[at] ^= 0x01;
    let (st, msg) = b.put(&format!("{bbase}/v1/snapshot"), bad).await.unwrap();
    assert_eq!(st, 400, "{msg}");
    assert_eq!(b.http.get(format!("{bbase}/v1/kv/snap/1")).send().await.unwrap().status(), 404);

    let (st, msg) = b.put(&format!("{bbase}/v1/snapshot"), archive).await.unwrap();
    assert_eq!(st, 200, "{msg}");
    for s in &b.servers {
        let url = format!("{}/v1/kv/snap/19?raw&stale", s.http());
        eventually("restored data on every server", SOON, || async {
            let r = b.http.get(&url).send().await.ok()?;
            (r.text().await.ok()? == "value 19").then_some(())
        })
        .await;
    }
    let svc = b.get_json(&format!("{bbase}/v1/catalog/service/db")).await.unwrap();
    assert_eq!(svc[0]["ServicePort"], 5432);
}

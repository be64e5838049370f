//! Two proxies in one process: nothing of one proxy lives outside its own `Shared` (no
//! `static` holds runtime state; `tests/layout.rs` checks the source, this test the
//! behaviour). Each has its own clients, cancel keys, pools and worker threads, and
//! shutting one down leaves the other serving.

mod common;

use std::time::Duration;

use common::*;
use switchyard::app::Proxy as InProcess;
use switchyard::config::Config;

async fn start(cluster: &LocalCluster, extra: &str) -> (InProcess, u16) {
    let (rw, ro) = (free_port(), free_port());
    let config = Config::parse(&cluster.config_toml(rw, ro, extra)).unwrap();
    let proxy = InProcess::start(config, None).await.unwrap();
    (proxy, rw)
}

async fn connected(port: u16) -> Held {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(h) = connect(port).await {
            if h.simple_query("SELECT 1").await.is_ok() {
                return h;
            }
        }
        assert!(std::time::Instant::now() < deadline, "no session through port {port}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn two_proxies_in_one_process_share_nothing_but_the_process() {
    let cluster = LocalCluster::start(1).unwrap();
    let rt = switchyard::app::runtime().unwrap();
    rt.block_on(async {
        let (a, a_port) = start(&cluster, "pool_mode = \"transaction\"\npool_size = 2\n").await;
        let (b, b_port) = start(&cluster, "").await;
        let a1 = connected(a_port).await;
        let a2 = connected(a_port).await;
        let b1 = connected(b_port).await;
        // Each proxy lists its own clients only.
        assert_eq!((a.shared.clients.len(), b.shared.clients.len()), (2, 1));

        // A cancel goes through the proxy that minted the key, to the right backend.
        for (client, who) in [(&a1, "a"), (&b1, "b")] {
            let token = client.cancel_token();
            let sleeping = client.simple_query("SELECT pg_sleep(30)");
            let cancel = async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            };
            let started = std::time::Instant::now();
            let (result, ()) = tokio::join!(sleeping, cancel);
            let e = result.expect_err("cancelled");
            assert_eq!(db_text(&e).split(':').next(), Some("57014"), "proxy {who}: {e}");
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "proxy {who}: cancelled at once"
            );
        }

        // One proxy goes; the other's clients and new ones are untouched.
        a.shutdown().await;
        drop((a1, a2));
        assert!(connect(a_port).await.is_err(), "the stopped proxy no longer listens");
        b1.simple_query("SELECT 1").await.unwrap();
        let b2 = connected(b_port).await;
        assert_eq!(b.shared.clients.len(), 2);
        drop(b2);
        b.shutdown().await;
    });
}

//! TLS on every leg (issue 17): a system started with a throwaway CA whose
//! PostgreSQL clusters refuse plaintext, whose Redis listens with TLS only,
//! and whose proxy requires TLS from clients. Clients (tokio-postgres with
//! rustls, psql, psycopg, pgjdbc) verify the proxy's certificate; the proxy
//! verifies the shards', db_default's and Redis's.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shardgate_tests::{connect, sqlstate, Cluster, Options, APP_USER};

fn psql(conninfo: &str, sql: &str) -> std::process::Output {
    Command::new("psql").args(["-X", "-At", "-v", "ON_ERROR_STOP=1", conninfo, "-c", sql]).output().expect("psql runs")
}

fn conninfo(cluster: &Cluster, sslmode: &str, ca: &Path) -> String {
    format!(
        "host=127.0.0.1 port={} user={} password={} dbname=shardgate sslmode={sslmode} sslrootcert={}",
        cluster.info.proxy_port,
        APP_USER.0,
        APP_USER.1,
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_leg_uses_tls() {
    let mut cluster =
        Cluster::start_temp(Options { tls: true, server_toml: "login_timeout_ms = 2000\n".into(), ..Default::default() }).expect("start a system with TLS on every leg");
    let ca = cluster.info.tls_ca.clone().expect("a TLS system has a CA");

    // 1. a rustls client that verifies the proxy: writes and reads through TLS shards
    let app = connect(&cluster.info.proxy_dsn).await.expect("TLS client logs in");
    app.batch_execute(
        "INSERT INTO t_order (id, merchant_id, order_no, order_amount, pay_status, create_time) \
         VALUES (7001, 3, 'tls-1', 10.00, 1, '2026-11-05 10:00:00+00'), (7002, 4, 'tls-2', 20.00, 1, '2026-10-05 10:00:00+00')",
    )
    .await
    .expect("insert through TLS to two shards (two-phase commit, lookup entries on db_default)");
    let row = app.query_one("SELECT order_no FROM t_order WHERE order_no = $1", &[&"tls-2"]).await.expect("read by order_no");
    assert_eq!(row.get::<_, String>(0), "tls-2");
    let n: i64 = app.query_one("SELECT count(*) FROM t_order", &[]).await.expect("count over every shard").get(0);
    assert_eq!(n, 2);

    // a cancel travels inside TLS to the proxy and inside TLS on to the shard (with sslmode
    // verify-full the proxy never falls back to plain text, so a broken path leaves the sleep running)
    let token = app.cancel_token();
    let tls = shardgate_config::tls::client_config(shardgate_config::SslMode::VerifyFull, Some(&ca.display().to_string())).expect("client TLS");
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone())).await
    });
    let t0 = std::time::Instant::now();
    let e = app.query("SELECT pg_sleep(20), id FROM t_order WHERE merchant_id = 3", &[]).await.expect_err("cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(3), "cancel took {:?}", t0.elapsed());
    canceller.await.expect("join").expect("cancel request sent over TLS");

    // 2. the proxy's connections to the shards are encrypted (and plaintext would be refused)
    let shard = connect(&cluster.info.shards[3]).await.expect("TLS connection to shard db_3");
    let (tls, plain): (i64, i64) = {
        let r = shard
            .query_one(
                "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.application_name = 'shardgate'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        (r.get(0), r.get(1))
    };
    // (the harness's pg_hba refuses plain TCP, so `plain` is 0 by construction; `tls` counts
    // the proxy's pooled and probe connections that negotiated TLS)
    assert!(tls >= 1 && plain == 0, "shardgate's connections to db_3: {tls} with TLS, {plain} without");
    let refused = tokio_postgres::connect(cluster.info.shards[3].split('?').next().unwrap_or_default(), tokio_postgres::NoTls)
        .await
        .err()
        .expect("the shard refuses a plaintext connection");
    assert_eq!(sqlstate(&refused).as_deref(), Some("28000"), "{refused}");

    // 3. Redis over TLS: a cached read fills it
    app.batch_execute("INSERT INTO t_merchant (merchant_id, merchant_name) VALUES (1, 'm1')").await.expect("insert a merchant");
    let port = cluster.info.redis_url.as_deref().and_then(|u| u.rsplit(':').next()).expect("redis port").to_string();
    let keys = || {
        let out = Command::new("redis-cli")
            .args(["--tls", "--cacert"])
            .arg(&ca)
            .args(["-p", &port, "--scan", "--pattern", "sg:*"])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let t0 = std::time::Instant::now();
    loop {
        let r = app.query("SELECT merchant_name FROM t_merchant WHERE merchant_id = 1", &[]).await.expect("cached table read");
        assert_eq!(r.len(), 1);
        if keys() > 0 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "no cache entry reached Redis over TLS; proxy log:\n{}", cluster.proxy_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 4. psql: verify-full works; a plaintext client is refused before authentication
    let out = psql(&conninfo(&cluster, "verify-full", &ca), "\\conninfo");
    assert!(out.status.success(), "psql verify-full: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("SSL connection"), "psql: {}", String::from_utf8_lossy(&out.stdout));
    let out = psql(&conninfo(&cluster, "verify-full", &ca), "SELECT order_no FROM t_order WHERE merchant_id = 3");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "tls-1");
    // SCRAM bound to the proxy's certificate (SCRAM-SHA-256-PLUS), as libpq can demand
    let out = psql(&format!("{} channel_binding=require", conninfo(&cluster, "verify-full", &ca)), "SELECT count(*) FROM t_order WHERE merchant_id = 3");
    assert!(out.status.success(), "psql channel_binding=require: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    let out = psql(&conninfo(&cluster, "disable", &ca), "SELECT 1");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("accepts only TLS"), "psql sslmode=disable: {}", String::from_utf8_lossy(&out.stderr));
    let e = tokio_postgres::connect(&cluster.info.proxy_dsn_for(APP_USER.0, APP_USER.1).replace(&format!("sslmode=verify-full&sslrootcert={}", ca.display()), "sslmode=disable"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("a plaintext tokio-postgres client is refused");
    assert_eq!(sqlstate(&e).as_deref(), Some("28000"), "{e}");
    // a client that trusts another CA does not accept the proxy's certificate
    let other = cluster.info.root.join("other-ca");
    shardgate_tests::make_certs(&other).expect("a second CA");
    let out = psql(&conninfo(&cluster, "verify-full", &other.join("ca.crt")), "SELECT 1");
    assert!(!out.status.success(), "psql trusted a certificate from another CA");
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate verify failed"), "{}", String::from_utf8_lossy(&out.stderr));

    // hostile handshakes: one that never finishes is closed by the login timeout; garbage
    // instead of a ClientHello is closed at once; bytes sent after SSLRequest before our
    // answer are refused (they could be a man in the middle's)
    let addr = format!("127.0.0.1:{}", cluster.info.proxy_port);
    let ssl_request = [0u8, 0, 0, 8, 4, 210, 22, 47];
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        s.write_all(&ssl_request).await.expect("SSLRequest");
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("answer");
        assert_eq!(&b, b"S");
        let t0 = std::time::Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest)).await.expect("closed within the login timeout").ok();
        assert!(t0.elapsed() >= Duration::from_millis(1500), "closed too early: {:?}", t0.elapsed());

        let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        s.write_all(&ssl_request).await.expect("SSLRequest");
        s.read_exact(&mut b).await.expect("answer");
        s.write_all(&[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5, 0, 0, 0, 0]).await.expect("garbage hello");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await.expect("garbage handshake closed at once").ok();

        let mut s = tokio::net::TcpStream::connect(&addr).await.expect("connect");
        let mut early = ssl_request.to_vec();
        early.extend_from_slice(b"\x16\x03\x01");
        s.write_all(&early).await.expect("SSLRequest with bytes behind it");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut rest)).await.expect("refused at once").ok();
        assert!(String::from_utf8_lossy(&rest).contains("unencrypted data after SSL request"), "{:?}", String::from_utf8_lossy(&rest));
    }

    // 5. psycopg 3
    let script = "import sys, psycopg\n\
        with psycopg.connect(sys.argv[1]) as c:\n\
        \x20   assert c.pgconn.ssl_in_use\n\
        \x20   print(c.execute('SELECT count(*) FROM t_order WHERE merchant_id = %s', (4,)).fetchone()[0])\n";
    let out = Command::new("python3").args(["-c", script, &conninfo(&cluster, "verify-full", &ca)]).output().expect("python3 runs");
    assert!(out.status.success(), "psycopg over TLS: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // asyncpg (ssl context with the CA; it verifies the host name)
    let script = "import asyncio, ssl, sys, asyncpg\n\
        async def main():\n\
        \x20   ctx = ssl.create_default_context(cafile=sys.argv[2])\n\
        \x20   c = await asyncpg.connect(sys.argv[1], ssl=ctx)\n\
        \x20   print(await c.fetchval('SELECT count(*) FROM t_order WHERE merchant_id = $1', 3))\n\
        \x20   await c.close()\n\
        asyncio.run(main())\n";
    let dsn = format!("postgres://{}:{}@127.0.0.1:{}/shardgate", APP_USER.0, APP_USER.1, cluster.info.proxy_port);
    let out = Command::new("python3").args(["-c", script, &dsn]).arg(&ca).output().expect("python3 runs");
    assert!(out.status.success(), "asyncpg over TLS: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");

    // 6. pgjdbc (ssl=true, verify-full against the CA file)
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("drivers/java/TlsCheck.java");
    let url = format!("jdbc:postgresql://127.0.0.1:{}/shardgate?ssl=true&sslmode=verify-full&sslrootcert={}&prepareThreshold=1", cluster.info.proxy_port, ca.display());
    let out = Command::new("java").args(["-cp", "/usr/share/java/postgresql.jar"]).arg(&source).args([&url, APP_USER.0, APP_USER.1]).output().expect("java runs");
    assert!(out.status.success(), "pgjdbc over TLS: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "count=1");

    // 7. a proxy whose shard DSN trusts another CA refuses to talk to that shard
    let config = std::fs::read_to_string(cluster.config_path()).expect("config");
    let db3 = format!("db_3?sslmode=verify-full&sslrootcert={}", ca.display());
    assert!(config.contains(&db3));
    // (reads of a shard it cannot reach fail instead of answering from fallback rows)
    let config = config.replace(&db3, &format!("db_3?sslmode=verify-full&sslrootcert={}", other.join("ca.crt").display())) + "\n[fallback]\npolicy = \"fail\"\n";
    std::fs::write(cluster.config_path(), config).expect("write config");
    cluster.stop_proxy(Duration::from_secs(10)).expect("stop proxy");
    cluster.start_proxy().expect("restart proxy with the wrong CA for db_3");
    let app = connect(&cluster.info.proxy_dsn).await.expect("log in");
    let e = app.query("SELECT order_no FROM t_order WHERE merchant_id = 3", &[]).await.expect_err("db_3's certificate is not trusted");
    assert!(format!("{e:?}").contains("db_3"), "{e:?}");
    let log = cluster.proxy_log();
    assert!(log.contains("TLS handshake with 127.0.0.1") && log.contains("invalid peer certificate"), "the log says why db_3 is unavailable:\n{log}");
    let ok = app.query("SELECT order_no FROM t_order WHERE merchant_id = 4", &[]).await.expect("db_4 is still trusted");
    assert_eq!(ok.len(), 1);
}

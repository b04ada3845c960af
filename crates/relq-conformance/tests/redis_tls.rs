//! `rediss://`: a TLS connection to a `redis-server` with a certificate from a private CA
//! (made with the `openssl` command for this test) works when the CA is trusted, and is refused
//! when it is not.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use relq::{Backend, RedisBackend, RedisConfig, Settlement, StartPosition};
use relq_conformance::redis_server::{RedisServer, ServerOptions};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (install it: apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1, in `dir`.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=relq test CA",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_trusted_private_ca_works_and_an_untrusted_server_is_refused() {
    if !relq_conformance::redis_server::available() {
        return;
    }
    let certs = std::env::temp_dir().join(format!("relq-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&certs);
    make_certs(&certs);
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = |f: &str| certs.join(f).display().to_string();
    let server = RedisServer::start_with(
        ServerOptions::default()
            .arg("tls-port", &tls_port.to_string())
            .arg("tls-cert-file", &path("server.crt"))
            .arg("tls-key-file", &path("server.key"))
            .arg("tls-ca-cert-file", &path("ca.crt"))
            .arg("tls-auth-clients", "no"),
    )
    .expect("redis-server is available");
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = std::fs::read(certs.join("ca.crt")).unwrap();

    let backend = RedisBackend::connect_with(&url, RedisConfig::default().tls_root_cert(ca))
        .await
        .expect("TLS connection with the CA trusted");
    let sub = backend
        .join("secure", "g", "c", StartPosition::Earliest)
        .await
        .unwrap();
    let ids = backend
        .publish(
            "secure",
            vec![relq::Outgoing {
                kind: "job".into(),
                payload: "over tls".into(),
                headers: Default::default(),
                deliver_at: None,
                dedup_window: None,
            }],
        )
        .await
        .unwrap();
    let got = backend
        .read(&sub, 10, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message.id, ids[0]);
    assert_eq!(got[0].message.payload.as_ref(), b"over tls");
    backend
        .settle(&sub, &[Settlement::Ack(ids[0])])
        .await
        .unwrap();
    // The message really went through the TLS port: the plain port sees it stored.
    assert!(server
        .cli(&["XRANGE", "relq:{secure}:s", "-", "+"])
        .contains("over tls"));

    // Without the private CA the server's certificate is not trusted.
    let untrusted = RedisBackend::connect_with(
        &url,
        RedisConfig::default().retry_for(Duration::from_millis(100)),
    )
    .await;
    assert!(
        untrusted.is_err(),
        "an untrusted certificate must be refused"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&certs);
}

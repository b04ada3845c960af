//! `relq serve`: the HTTP admin API, metrics and health endpoints (the `relq-admin` router).

use std::net::SocketAddr;

use relq::{Broker, Config, TokenEntry, TokenRole};
use serde_json::json;

use crate::{exit, shutdown_signal, Exit};

#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (default server.bind, 127.0.0.1:8080). Port 0 picks a free port;
    /// the address is printed at start.
    #[arg(long)]
    bind: Option<String>,
    /// Print the OpenAPI document of the API and exit.
    #[arg(long)]
    print_openapi: bool,
}

pub(crate) fn wants_openapi(args: &ServeArgs) -> bool {
    args.print_openapi
}

pub(crate) async fn run(
    broker: Broker,
    config: &Config,
    args: ServeArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let mut server = config.server.clone();
    if let Some(b) = args.bind {
        server.bind = b;
    }
    let addr: SocketAddr = server.bind.parse().map_err(|e| {
        exit(
            Exit::USAGE,
            format!(
                "server.bind = {:?} is not an address ({e}); e.g. 127.0.0.1:8080",
                server.bind
            ),
        )
    })?;
    let mut tokens = server.tokens.clone();
    if let Ok(t) = std::env::var("RELQ_ADMIN_TOKEN") {
        if t.len() < 16 {
            return Err(exit(
                Exit::USAGE,
                "RELQ_ADMIN_TOKEN must be at least 16 characters",
            ));
        }
        tokens.push(TokenEntry::new("env", t, TokenRole::Admin));
    }
    if tokens.is_empty() && !addr.ip().is_loopback() {
        return Err(exit(
            Exit::USAGE,
            format!("refusing to serve on {addr} without authentication: add [[server.tokens]] to the configuration or set RELQ_ADMIN_TOKEN, or bind to 127.0.0.1"),
        ));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| exit(Exit::FAILED, format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    if tokens.is_empty() {
        tracing::warn!("no tokens configured: the admin API is unauthenticated (loopback only)");
        eprintln!("relq serve: WARNING: no tokens configured, the admin API is unauthenticated (bound to loopback {local})");
    }
    let app = relq_admin::Admin::new(broker)
        .configure(&server)
        .routes(config.routes.clone())
        .tokens(tokens)
        .metrics(relq_admin::install_recorder())
        .router();
    let tls = match (&server.tls_cert, &server.tls_key) {
        (Some(cert), Some(key)) => {
            // ring, as the Redis backend's TLS uses; a provider installed already stays.
            let _ = rustls::crypto::ring::default_provider().install_default();
            Some(
                axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                    .await
                    .map_err(|e| {
                        exit(
                            Exit::USAGE,
                            format!(
                                "server.tls_cert {} / server.tls_key {}: {e}",
                                cert.display(),
                                key.display()
                            ),
                        )
                    })?,
            )
        }
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    if json_out {
        println!("{}", json!({ "listening": format!("{scheme}://{local}") }));
    } else {
        println!("relq serve: listening on {scheme}://{local} (console /, API /api, metrics /metrics, health /readyz, document /openapi.json)");
    }
    let signal = shutdown_signal();
    match tls {
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let name = signal.await;
                    tracing::info!(signal = %name, "shutting down");
                })
                .await?;
        }
        Some(tls) => {
            let handle = axum_server::Handle::new();
            let stopper = handle.clone();
            tokio::spawn(async move {
                let name = signal.await;
                tracing::info!(signal = %name, "shutting down");
                stopper.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
            });
            axum_server::from_tcp_rustls(listener.into_std()?, tls)
                .handle(handle)
                .serve(app.into_make_service())
                .await?;
        }
    }
    Ok(())
}

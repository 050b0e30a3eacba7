//! The HTTP server around the app, assembled from actix-web's own layers (actix-server,
//! actix-http) rather than `HttpServer`, because each connection is wrapped before actix
//! reads it ([`crate::connection`]) and `HttpServer` offers no place to do that.

use std::sync::Arc;
use std::time::Duration;

use actix_http::{HttpService, KeepAlive};
use actix_service::{IntoServiceFactory, ServiceFactoryExt, fn_service, map_config};
use actix_web::dev::{AppConfig, Extensions};
use actix_web::rt::net::TcpStream;

use crate::app;
use crate::client;
use crate::connection::{GuardedStream, OnRefused};
use crate::state::SearcherState;

/// How the server runs (the rest is fixed below).
#[derive(Debug, Clone, Copy)]
pub struct ServerSettings {
    /// Threads answering HTTP (searches themselves run on the search pool).
    pub workers: usize,
    /// Open connections each worker holds at most; more wait in the listen backlog.
    pub max_connections: usize,
}

/// A client must send its request head within this time (slow headers).
const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle keep-alive connection is closed after this time.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A closing connection gets this long to take its last bytes (and a refusal's drain).
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// On a graceful stop, open requests get this long to finish.
const SHUTDOWN_TIMEOUT_SECONDS: u64 = 10;

/// The server on `listener`, ready to be awaited (or spawned) inside an actix system.
pub fn http_server(listener: std::net::TcpListener, state: Arc<SearcherState>, settings: ServerSettings) -> std::io::Result<actix_server::Server> {
    let local_addr = listener.local_addr()?;
    let server = actix_server::Server::build()
        .workers(settings.workers)
        .max_concurrent_connections(settings.max_connections)
        .shutdown_timeout(SHUTDOWN_TIMEOUT_SECONDS)
        .listen("shoplens-searcher", listener, move || {
            let on_refused: OnRefused = {
                let state = state.clone();
                // Counted like the app counts the 414s it answers itself.
                Arc::new(move || state.metrics.request("unmatched", 414, 0.0))
            };
            let app = app::build(state.clone()).into_factory().map_err(|e: actix_web::Error| e.error_response());
            let http = HttpService::build()
                .keep_alive(KeepAlive::Timeout(KEEP_ALIVE))
                .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
                .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
                .local_addr(local_addr)
                .on_connect_ext(|io: &GuardedStream<TcpStream>, data: &mut Extensions| client::remember_socket(io.get_ref(), data))
                // The app's config only names a host for requests without a Host header
                // (nothing here reads it); actix-web's default is the one public constructor.
                .h1(map_config(app, |_: ()| AppConfig::default()));
            fn_service(move |stream: TcpStream| {
                let peer = stream.peer_addr().ok();
                // Answers are written whole; Nagle's delay would only add latency.
                let _ = stream.set_nodelay(true);
                std::future::ready(Ok((GuardedStream::new(stream, on_refused.clone()), peer)))
            })
            .and_then(http)
        })?
        .run();
    Ok(server)
}

//! A real STAC API in-process: rustac's `stac-server` (memory backend, axum) behind our token
//! layer, with the token endpoint at `/token`.

use super::tokens::{self, Issuer};
use axum::Router;
use axum::routing::post;
use serde_json::Value;
use stac::api::TransactionClient;
use stac_server::{Api, MemoryBackend};
use std::sync::Arc;

/// A running server.
pub struct StacServer {
    /// The STAC root, `http://127.0.0.1:PORT/`.
    pub url: String,
    /// The token endpoint.
    pub token_url: String,
    pub issuer: Arc<Issuer>,
    pub backend: MemoryBackend,
    task: tokio::task::JoinHandle<()>,
}

impl StacServer {
    /// Its port.
    pub fn port(&self) -> u16 {
        url::Url::parse(&self.url)
            .ok()
            .and_then(|url| url.port())
            .expect("the server's URL has a port")
    }

    /// The same API at the same address (resume points and next links stay valid), now
    /// holding `items` (the source changed upstream).
    pub async fn restart_with(self, items: &[Value]) -> StacServer {
        let (issuer, port) = (self.issuer.clone(), self.port());
        self.stop().await;
        start_with(items, issuer, port, |router| router).await
    }

    /// Stops serving and frees the port (connections already open stay up; each run builds
    /// its own HTTP client, so the next run connects anew).
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Starts a server holding `items` (their collections are created).
pub async fn start(items: &[Value], issuer: Arc<Issuer>) -> StacServer {
    start_with(items, issuer, 0, |router| router).await
}

/// Like [`start`], on `port`, with `wrap` applied to the STAC routes (behind the token check).
pub async fn start_with(
    items: &[Value],
    issuer: Arc<Issuer>,
    port: u16,
    wrap: impl FnOnce(Router) -> Router,
) -> StacServer {
    start_with_collections(&[], items, issuer, port, wrap).await
}

/// Like [`start_with`], serving `collections` as given (an `item_assets`, say); the items'
/// other collections are made.
pub async fn start_with_collections(
    given: &[Value],
    items: &[Value],
    issuer: Arc<Issuer>,
    port: u16,
    wrap: impl FnOnce(Router) -> Router,
) -> StacServer {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let url = format!("http://{address}/");
    let mut backend = MemoryBackend::new();
    let mut collections = std::collections::BTreeSet::new();
    for collection in given {
        let collection: stac::Collection =
            serde_json::from_value(collection.clone()).expect("a STAC collection");
        collections.insert(collection.id.clone());
        backend
            .add_collection(collection)
            .await
            .expect("collection");
    }
    for item in items {
        let collection = item["collection"].as_str().expect("collection").to_string();
        if collections.insert(collection.clone()) {
            backend
                .add_collection(stac::Collection::new(&collection, "test collection"))
                .await
                .expect("collection");
        }
        let item: stac::Item = serde_json::from_value(item.clone()).expect("a STAC item");
        backend.add_item(item).await.expect("item");
    }
    let api = Api::new(backend.clone(), &url).expect("api");
    let app = wrap(stac_server::routes::from_api(api))
        .layer(axum::middleware::from_fn_with_state(
            issuer.clone(),
            tokens::require_token,
        ))
        .merge(
            Router::new()
                .route("/token", post(tokens::token_endpoint))
                .with_state(issuer.clone()),
        );
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    StacServer {
        task,
        token_url: format!("{url}token"),
        url,
        issuer,
        backend,
    }
}

//! Talking to a STAC API: HTTP with retries and a cap on requests in flight ([`http`]), tokens
//! ([`auth`]), the client that joins them and discovers what the server offers ([`client`]),
//! the search requests and next links ([`search`]), and a page read into items as it arrives
//! ([`reader`]). Nothing here stores anything.

pub mod auth;
pub mod bulk;
pub mod client;
pub mod http;
pub mod reader;
pub mod search;

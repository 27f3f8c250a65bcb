//! The one HTTP retry helper, used by the token endpoint and the STAC API alike.
//!
//! Connect, read and total timeouts are set on the client ([`client`]). [`send`] retries
//! transport failures (connect errors, resets, timeouts, a body cut short) and retryable
//! statuses (408, 429, 5xx) with full-jitter exponential backoff, honouring `Retry-After` in
//! both forms (RFC 9110 §10.2.3), within a bounded number of retries and a bounded total wait.
//! What a complete response *means* is the caller's decision ([`Verdict`]).

use crate::config::{HttpSettings, RetryPolicy};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{RequestBuilder, StatusCode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};
use tokio::sync::Semaphore;

impl RetryPolicy {
    /// The full-jitter backoff before retry number `retry` (0-based): a uniformly random wait
    /// between zero and `min(max, base * 2^retry)`.
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(30)))
            .min(self.max);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// Counters shared by every request of a run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Retries made.
    pub retries: AtomicU64,
    /// Tokens obtained after the first.
    pub token_renewals: AtomicU64,
}

impl Stats {
    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The cap on requests in flight, adjusted like TCP's congestion window: a 429 halves it
/// (down to 1), and each run of `limit` successful requests raises it by one, back up to the
/// configured maximum. Shrinking takes effect as permits come back: a returned permit is
/// forgotten while the cap owes some.
#[derive(Debug)]
pub struct Cap {
    semaphore: Semaphore,
    max: usize,
    state: std::sync::Mutex<CapState>,
}

#[derive(Debug)]
struct CapState {
    limit: usize,
    debt: usize,
    successes: usize,
}

/// A permit to send one request; returned (or forgotten, while the cap shrinks) on drop.
#[derive(Debug)]
pub struct CapPermit<'a> {
    cap: &'a Cap,
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
}

impl Drop for CapPermit<'_> {
    fn drop(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let mut state = self.cap.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.debt > 0 {
            state.debt -= 1;
            permit.forget();
        }
    }
}

impl Cap {
    /// A cap of `max` requests in flight.
    pub fn new(max: usize) -> Cap {
        let max = max.max(1);
        Cap {
            semaphore: Semaphore::new(max),
            max,
            state: std::sync::Mutex::new(CapState {
                limit: max,
                debt: 0,
                successes: 0,
            }),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).limit
    }

    /// Waits for a permit.
    pub async fn acquire(&self) -> Option<CapPermit<'_>> {
        let permit = self.semaphore.acquire().await.ok()?;
        Some(CapPermit {
            cap: self,
            permit: Some(permit),
        })
    }

    /// The API said 429: halve the cap.
    pub fn throttled(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let target = (state.limit / 2).max(1);
        let cut = state.limit - target;
        if cut > 0 {
            state.limit = target;
            state.successes = 0;
            // Take idle permits now; the rest as requests in flight return theirs.
            let taken = self.semaphore.forget_permits(cut);
            state.debt += cut - taken;
            tracing::warn!(limit = target, "rate limited: fewer requests in flight");
        }
    }

    /// A request succeeded: grow back slowly.
    pub fn succeeded(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.limit >= self.max {
            return;
        }
        state.successes += 1;
        if state.successes >= state.limit {
            state.successes = 0;
            state.limit += 1;
            if state.debt > 0 {
                state.debt -= 1;
            } else {
                self.semaphore.add_permits(1);
            }
        }
    }
}

/// A complete response: status and the whole body.
#[derive(Debug)]
pub struct Fetched {
    /// The status.
    pub status: StatusCode,
    /// The body, read to the end.
    pub body: Bytes,
}

/// The caller's reading of a complete, non-retryable-status response.
#[derive(Debug)]
pub enum Verdict<T> {
    /// Use this result.
    Done(T),
    /// The response was unusable (a truncated or malformed body): try again.
    Retry(String),
}

/// A request that failed for good.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Still failing after the retries.
    #[error("{what} {url}: {last} (gave up after {attempts} attempts)")]
    Exhausted {
        /// What was being requested ("search page", "token").
        what: &'static str,
        /// The URL, without query secrets.
        url: String,
        /// The last failure: a status or a transport error.
        last: String,
        /// Attempts made.
        attempts: u32,
        /// The last HTTP status, if any.
        status: Option<StatusCode>,
    },
    /// The request could not even be built or sent (a bad URL, a redirect loop): not retried.
    #[error("{what} {url}: {source}")]
    Fatal {
        /// What was being requested.
        what: &'static str,
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

/// Builds the HTTP client with every timeout set (rustls only).
pub fn client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .read_timeout(settings.read_timeout)
        .timeout(settings.timeout)
        .user_agent(concat!("stac-sync/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Whether a transport error is worth retrying: connection failures, resets, timeouts and
/// bodies cut short are; a request we could not build, or a redirect loop, is not.
pub fn is_retryable_error(error: &reqwest::Error) -> bool {
    !(error.is_builder() || error.is_redirect())
        && (error.is_connect()
            || error.is_timeout()
            || error.is_request()
            || error.is_body()
            || error.is_decode())
}

/// Whether a status is worth retrying.
pub fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Sends a request built by `build` until `accept` takes a response, retrying what is
/// retryable. `url` names the request in messages. `permits` caps requests in flight; a permit
/// is held per attempt, not while waiting to retry.
pub async fn send<T: Send>(
    what: &'static str,
    url: &str,
    policy: &RetryPolicy,
    stats: &Stats,
    permits: Option<&Cap>,
    build: impl Fn() -> RequestBuilder + Send,
    mut accept: impl FnMut(Fetched) -> Verdict<T> + Send,
) -> Result<T, HttpError> {
    send_streamed(
        what,
        url,
        policy,
        stats,
        permits,
        &mut Whole {
            build,
            accept: &mut accept,
        },
    )
    .await
}

/// Reads the body of a response (one whose status is not retried) as it arrives.
///
/// A trait with a boxed future, not an async closure: the future of an `AsyncFnMut` cannot be
/// shown to be `Send` for every borrow of the closure, and callers spawn these requests.
pub trait ReadBody: Send {
    /// What reading gives.
    type Output: Send;
    /// Reads `response`.
    fn read(&mut self, response: reqwest::Response) -> BoxFuture<'_, Self::Output>;
}

/// One exchange of [`send_streamed`]: the request of each attempt, and the reading of the
/// response.
pub trait Exchange: ReadBody {
    /// The request of one attempt, built once its permit is held (so that a token in it is as
    /// fresh as can be however long the wait was), or the outcome without sending it.
    fn request(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Self::Output>>;
}

/// Builds each attempt with a function, and reads a whole body, then hands it to another.
struct Whole<'f, B, F> {
    build: B,
    accept: &'f mut F,
}

impl<T: Send, B: Fn() -> RequestBuilder + Send, F: FnMut(Fetched) -> Verdict<T> + Send> ReadBody
    for Whole<'_, B, F>
{
    type Output = Verdict<T>;
    fn read(&mut self, response: reqwest::Response) -> BoxFuture<'_, Verdict<T>> {
        Box::pin(async move {
            let status = response.status();
            match read_body(response).await {
                Err(why) => Verdict::Retry(why),
                Ok(body) => (self.accept)(Fetched { status, body }),
            }
        })
    }
}

impl<T: Send, B: Fn() -> RequestBuilder + Send, F: FnMut(Fetched) -> Verdict<T> + Send> Exchange
    for Whole<'_, B, F>
{
    fn request(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Verdict<T>>> {
        Box::pin(async move { Ok((self.build)()) })
    }
}

/// [`send`], with `exchange` building each attempt's request once its permit is held, and
/// reading the body of a response that is not retried by its status as it arrives (the permit
/// is held until it returns).
pub async fn send_streamed<T: Send>(
    what: &'static str,
    url: &str,
    policy: &RetryPolicy,
    stats: &Stats,
    permits: Option<&Cap>,
    exchange: &mut impl Exchange<Output = Verdict<T>>,
) -> Result<T, HttpError> {
    let mut retries = 0u32;
    let mut waited = Duration::ZERO;
    loop {
        let (last, status, hint) = 'attempt: {
            let _permit = match permits {
                Some(cap) => cap.acquire().await,
                None => None,
            };
            let request = match exchange.request().await {
                Ok(request) => request,
                Err(Verdict::Done(value)) => return Ok(value),
                // Retried like a transport failure.
                Err(Verdict::Retry(why)) => break 'attempt (why, None, None),
            };
            match request.send().await {
                Err(e) if is_retryable_error(&e) => (describe(&e), None, None),
                Err(source) => {
                    return Err(HttpError::Fatal {
                        what,
                        url: url.to_string(),
                        source,
                    });
                }
                Ok(response) => {
                    let status = response.status();
                    if status == StatusCode::TOO_MANY_REQUESTS
                        && let Some(cap) = permits
                    {
                        cap.throttled();
                    }
                    if is_retryable_status(status) {
                        let hint = retry_after(response.headers(), SystemTime::now());
                        (format!("HTTP {status}"), Some(status), hint)
                    } else {
                        match exchange.read(response).await {
                            Verdict::Done(value) => {
                                if let Some(cap) = permits {
                                    cap.succeeded();
                                }
                                return Ok(value);
                            }
                            Verdict::Retry(why) => (why, Some(status), None),
                        }
                    }
                }
            }
        };
        let delay = hint.unwrap_or_else(|| policy.backoff(retries));
        if retries >= policy.max_retries || waited + delay > policy.budget {
            return Err(HttpError::Exhausted {
                what,
                url: url.to_string(),
                last,
                attempts: retries + 1,
                status,
            });
        }
        retries += 1;
        waited += delay;
        stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(what, %url, error = %last, retry = retries, delay = ?delay, "retrying");
        tokio::time::sleep(delay).await;
    }
}

/// A URL for messages: without query string (paging tokens are long and may be sensitive)
/// and without credentials.
pub fn display_url(url: &url::Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    let _ = url.set_password(None);
    let _ = url.set_username("");
    url.to_string()
}

/// A transport error with its causes, which reqwest keeps in the source chain.
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Reads a body into one buffer, sized from `Content-Length` when the server sends it
/// (`Response::bytes` collects the chunks and then copies them into one buffer, holding a large
/// page twice for a moment). Growing without a length is left to the allocator. A failure is
/// described for a retry message.
pub async fn read_body(response: reqwest::Response) -> Result<bytes::Bytes, String> {
    let status = response.status();
    read_chunks(response)
        .await
        .map_err(|e| format!("HTTP {status}, body: {}", describe(&e)))
}

async fn read_chunks(mut response: reqwest::Response) -> Result<bytes::Bytes, reqwest::Error> {
    let expected = response
        .content_length()
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0)
        // A length is a promise, not a fact: never reserve more than this up front.
        .min(MAX_RESERVED_BODY);
    let mut body = bytes::BytesMut::with_capacity(expected);
    while let Some(chunk) = response.chunk().await? {
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The most a response's `Content-Length` reserves before its bytes arrive.
const MAX_RESERVED_BODY: usize = 512 << 20;

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_is_read_in_seconds_and_as_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        headers.insert(RETRY_AFTER, HeaderValue::from_str(&later).expect("header"));
        assert_eq!(retry_after(&headers, now), Some(Duration::from_secs(90)));
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&headers, now), Some(Duration::ZERO));
        headers.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&headers, now), None);
    }

    #[tokio::test]
    async fn a_429_halves_the_cap_and_successes_grow_it_back_slowly() {
        let cap = Cap::new(8);
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| cap.acquire())).await;

        cap.throttled();

        assert_eq!(cap.limit(), 4);
        drop(held);
        let now: Vec<_> = futures_util::future::join_all((0..4).map(|_| cap.acquire())).await;
        assert!(
            cap.semaphore.try_acquire().is_err(),
            "more than 4 permits after the cut"
        );
        drop(now);
        for _ in 0..4 {
            cap.succeeded();
        }
        assert_eq!(cap.limit(), 5);
        let five: Vec<_> = futures_util::future::join_all((0..5).map(|_| cap.acquire())).await;
        assert!(cap.semaphore.try_acquire().is_err());
        drop(five);
        cap.throttled();
        cap.throttled();
        cap.throttled();
        assert_eq!(cap.limit(), 1);
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_ceiling() {
        let policy = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            ..RetryPolicy::default()
        };
        for retry in 0..20 {
            let ceiling = Duration::from_millis((100u64 << retry.min(10)).min(1000));
            assert!(policy.backoff(retry) <= ceiling);
        }
    }
}

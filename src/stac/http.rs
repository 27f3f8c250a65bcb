//! The one HTTP retry helper, used by the token endpoint and the STAC API alike.
//!
//! Connect, read and total timeouts are set on the client ([`client`]). [`send`] retries
//! transport failures (connect errors, resets, timeouts) and retryable statuses (408, 429, 5xx)
//! with full-jitter exponential backoff, honouring `Retry-After` in both forms (RFC 9110
//! §10.2.3), within a bounded number of retries and a bounded total wait ([`Attempts`]), and
//! returns the first response it need not retry. Reading its body, and deciding what it means,
//! is the caller's: a body cut short is retried by the caller through the same [`Attempts`].

use crate::config::{HttpSettings, RetryPolicy};
use crate::error::Error;
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
pub(crate) struct Cap {
    semaphore: Semaphore,
    max: usize,
    state: std::sync::Mutex<CapState>,
    pace: Pace,
}

/// When the next request may go: at most `1 / interval` requests a second (providers limit the
/// rate as well as the requests in flight), and none while the server asked for a pause
/// (`Retry-After` on a 429 holds for every request to the API, not just the one refused).
#[derive(Debug)]
struct Pace {
    /// Zero: no limit on the rate.
    interval: Duration,
    next: std::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    fn new(per_second: Option<f64>) -> Pace {
        let interval = per_second
            .filter(|rate| rate.is_finite() && *rate > 0.0)
            .map_or(Duration::ZERO, |rate| Duration::from_secs_f64(1.0 / rate));
        Pace {
            interval,
            next: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Takes the next slot, and waits for it.
    async fn wait(&self) {
        let now = tokio::time::Instant::now();
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let at = (*next).max(now);
            *next = at + self.interval;
            at
        };
        if at > now {
            tokio::time::sleep_until(at).await;
        }
    }

    /// No request before `wait` from now.
    fn pause(&self, wait: Duration) {
        let until = tokio::time::Instant::now() + wait;
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        *next = (*next).max(until);
    }
}

#[derive(Debug)]
struct CapState {
    limit: usize,
    debt: usize,
    successes: usize,
}

/// A permit to send one request; returned (or forgotten, while the cap shrinks) on drop.
#[derive(Debug)]
pub(crate) struct CapPermit<'a> {
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
    /// A cap of `max` requests in flight, and of `per_second` requests a second if given.
    pub fn new(max: usize, per_second: Option<f64>) -> Cap {
        let max = max.max(1);
        Cap {
            semaphore: Semaphore::new(max),
            max,
            state: std::sync::Mutex::new(CapState {
                limit: max,
                debt: 0,
                successes: 0,
            }),
            pace: Pace::new(per_second),
        }
    }

    /// The current limit.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).limit
    }

    /// Waits for a permit, then for the request's turn under the rate limit and any pause.
    pub async fn acquire(&self) -> Option<CapPermit<'_>> {
        let permit = self.semaphore.acquire().await.ok()?;
        self.pace.wait().await;
        Some(CapPermit {
            cap: self,
            permit: Some(permit),
        })
    }

    /// The API said 429, and asked every request to wait `pause` (its `Retry-After`, when the
    /// retry budget allows for it): halve the cap, and hold every request for the pause.
    pub fn throttled(&self, pause: Option<Duration>) {
        if let Some(pause) = pause {
            self.pace.pause(pause);
        }
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

pub use crate::error::HttpError;

/// Why one attempt at a request failed: what its retry logs and, once the retries run out, the
/// error says.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// A status that is retried (408, 429, 5xx; 413 for a smaller page).
    #[error("HTTP {0}")]
    Status(StatusCode),
    /// The request, or its body after `status`, failed in transport: a reset, a timeout, a
    /// body cut short.
    #[error("{}{}{}", status.map(|s| format!("HTTP {s}, ")).unwrap_or_default(),
        if *body { "body: " } else { "" }, describe(source))]
    Transport {
        /// The answer's status, when the body failed after it.
        status: Option<StatusCode>,
        /// Whether the body failed (not the request).
        body: bool,
        /// reqwest's error.
        #[source]
        source: reqwest::Error,
    },
    /// The body arrived but is not what was asked for (not JSON, cut short by a proxy).
    #[error("{0}")]
    Body(String),
    /// A search page that does not read as one (cut short, not an ItemCollection).
    #[error(transparent)]
    Page(#[from] crate::stac::reader::PageError),
}

impl Failed {
    /// Whether the attempt timed out (a page that times out is asked for in smaller pages).
    pub fn timed_out(&self) -> bool {
        matches!(self, Failed::Transport { source, .. } if source.is_timeout())
    }
}

/// Redirects followed within one origin, at most.
const MAX_REDIRECTS: usize = 10;

/// Builds the HTTP client with every timeout set (rustls only). It follows redirects within the
/// request's origin only: a redirect to another origin comes back as the response, for [`send`]
/// to follow without credentials (reqwest would strip `Authorization` there, but not a
/// configured header such as `X-Api-Key`).
pub fn client(settings: &HttpSettings) -> Result<reqwest::Client, reqwest::Error> {
    let same_origin = reqwest::redirect::Policy::custom(|attempt| {
        let first = attempt.previous().first().map(url::Url::origin);
        if attempt.previous().len() > MAX_REDIRECTS {
            attempt.error(format!("more than {MAX_REDIRECTS} redirects"))
        } else if first.is_some_and(|first| first != attempt.url().origin()) {
            attempt.stop()
        } else {
            attempt.follow()
        }
    });
    reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .read_timeout(settings.read_timeout)
        .timeout(settings.timeout)
        .redirect(same_origin)
        .user_agent(concat!("stac-sync/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Whether a transport error is worth retrying: connection failures, resets, timeouts and
/// bodies cut short are; a request we could not build, or a redirect loop, is not.
pub(crate) fn is_retryable_error(error: &reqwest::Error) -> bool {
    !(error.is_builder() || error.is_redirect())
        && (error.is_connect()
            || error.is_timeout()
            || error.is_request()
            || error.is_body()
            || error.is_decode())
}

/// Whether a status is worth retrying.
pub(crate) fn is_retryable_status(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    // An HTTP-date is to the second: so is the wait (rounded up, to wait until that second),
    // not to the nanosecond of this machine's clock.
    let wait = at.duration_since(now).unwrap_or(Duration::ZERO);
    Some(Duration::from_secs(
        wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
    ))
}

/// The request of each attempt, built once the attempt's permit is held (so that a token in it
/// is as fresh as can be however long the wait was).
///
/// A trait with a boxed future, not an async closure: the future of an `AsyncFnMut` cannot be
/// shown to be `Send` for every borrow of the closure, and callers spawn these requests.
pub(crate) trait BuildRequest: Send {
    /// The request of one attempt, or why it cannot be made.
    fn build(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Error>>;

    /// An attempt failed with `status` (`None`: in transport; `timeout`: it timed out): whether
    /// the next attempt is changed to avoid it (a smaller page). A retryable failure is retried
    /// either way; a 413 only when this says so.
    fn failed(&mut self, _status: Option<StatusCode>, _timeout: bool) -> bool {
        false
    }

    /// The server redirected an attempt (`status`) to `to`, in another origin: whether the
    /// next attempts go there (built without credentials). If not, the redirect is the answer.
    fn redirected(&mut self, _to: &url::Url, _status: StatusCode) -> bool {
        false
    }
}

/// Builds each attempt with a function.
pub(crate) struct BuildWith<F>(pub F);

impl<F: Fn() -> RequestBuilder + Send> BuildRequest for BuildWith<F> {
    fn build(&mut self) -> BoxFuture<'_, Result<RequestBuilder, Error>> {
        let request = (self.0)();
        Box::pin(async move { Ok(request) })
    }
}

/// The attempts of one request, against its retry policy: how many were made and how long they
/// waited. A request's retries include those of its body: a caller that reads a body and fails
/// calls [`Attempts::retry`] before sending again.
pub(crate) struct Attempts<'a> {
    what: &'static str,
    url: &'a str,
    policy: &'a RetryPolicy,
    stats: &'a Stats,
    /// Turns a request that failed for good into the run's error.
    give_up: fn(HttpError) -> Error,
    retries: u32,
    waited: Duration,
}

impl<'a> Attempts<'a> {
    /// The attempts of a request for `what` at `url` (shown in messages).
    pub fn new(
        what: &'static str,
        url: &'a str,
        policy: &'a RetryPolicy,
        stats: &'a Stats,
        give_up: fn(HttpError) -> Error,
    ) -> Attempts<'a> {
        Attempts {
            what,
            url,
            policy,
            stats,
            give_up,
            retries: 0,
            waited: Duration::ZERO,
        }
    }

    /// What is requested.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Waits before the next attempt after `last` failed (as long as `hint`, the server's
    /// `Retry-After`, says, else a backoff), or gives up when the policy's retries or total wait
    /// would be exceeded.
    pub async fn retry(
        &mut self,
        last: Failed,
        status: Option<StatusCode>,
        hint: Option<Duration>,
    ) -> Result<(), Error> {
        let delay = hint.unwrap_or_else(|| self.policy.backoff(self.retries));
        if self.retries >= self.policy.max_retries || self.waited + delay > self.policy.budget {
            let last = match hint {
                Some(wait) if self.waited + wait > self.policy.budget => format!(
                    "{last}; the server asked to wait {} (Retry-After), longer than the {} left \
                     of the retry budget ([http] retry_budget)",
                    humantime::format_duration(wait),
                    humantime::format_duration(self.policy.budget.saturating_sub(self.waited))
                ),
                _ => last.to_string(),
            };
            return Err((self.give_up)(HttpError::Exhausted {
                what: self.what,
                url: self.url.to_string(),
                last,
                attempts: self.retries + 1,
                status,
            }));
        }
        self.retries += 1;
        self.waited += delay;
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(what = self.what, url = %self.url, error = %last, retry = self.retries,
            delay = ?delay, "retrying");
        tokio::time::sleep(delay).await;
        Ok(())
    }
}

/// A response whose status is not retried, with the permit of its request: the caller reads
/// the body within the cap on requests in flight, and the permit goes back when this is dropped.
pub(crate) struct Sent<'c> {
    /// The response, its body unread.
    pub response: reqwest::Response,
    _permit: Option<CapPermit<'c>>,
}

impl Sent<'_> {
    /// Reads the whole body, then gives the permit back.
    pub async fn body(self) -> Result<bytes::Bytes, Failed> {
        read_body(self.response).await
    }
}

/// Sends the request `build` makes until a response arrives whose status is not retried:
/// transport failures (connect errors, resets, timeouts) and 408, 429 and 5xx are retried within
/// `attempts`, honouring `Retry-After`. `permits` caps requests in flight: a permit is held per
/// attempt, not while waiting to retry. The body is the caller's to read.
pub(crate) async fn send<'c>(
    attempts: &mut Attempts<'_>,
    permits: Option<&'c Cap>,
    build: &mut dyn BuildRequest,
) -> Result<Sent<'c>, Error> {
    let mut redirects = 0;
    loop {
        let permit = match permits {
            Some(cap) => cap.acquire().await,
            None => None,
        };
        let (last, status, hint) = match build.build().await?.send().await {
            Err(e) if is_retryable_error(&e) => {
                build.failed(None, e.is_timeout());
                let failed = Failed::Transport {
                    status: None,
                    body: false,
                    source: e,
                };
                (failed, None, None)
            }
            Err(source) => {
                return Err((attempts.give_up)(HttpError::Fatal {
                    what: attempts.what,
                    url: attempts.url.to_string(),
                    source,
                }));
            }
            Ok(response)
                if response.status() == StatusCode::PAYLOAD_TOO_LARGE
                    && build.failed(Some(response.status()), false) =>
            {
                (
                    Failed::Status(response.status()),
                    Some(response.status()),
                    None,
                )
            }
            Ok(response) if is_retryable_status(response.status()) => {
                let status = response.status();
                build.failed(Some(status), false);
                let hint = retry_after(response.headers(), SystemTime::now());
                if status == StatusCode::TOO_MANY_REQUESTS
                    && let Some(cap) = permits
                {
                    // A pause longer than this request would wait ends the request instead.
                    cap.throttled(hint.filter(|wait| *wait <= attempts.policy.budget));
                }
                (Failed::Status(status), Some(status), hint)
            }
            Ok(response)
                if redirects < MAX_REDIRECTS
                    && let Some(to) = redirect_target(&response)
                    && build.redirected(&to, response.status()) =>
            {
                redirects += 1;
                continue;
            }
            Ok(response) => {
                if let Some(cap) = permits {
                    cap.succeeded();
                }
                return Ok(Sent {
                    response,
                    _permit: permit,
                });
            }
        };
        drop(permit);
        attempts.retry(last, status, hint).await?;
    }
}

/// Where a redirect the client did not follow (to another origin) points.
fn redirect_target(response: &reqwest::Response) -> Option<url::Url> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response
        .headers()
        .get(reqwest::header::LOCATION)?
        .to_str()
        .ok()?;
    response.url().join(location).ok()
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
pub(crate) fn describe(error: &reqwest::Error) -> String {
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
pub(crate) async fn read_body(response: reqwest::Response) -> Result<bytes::Bytes, Failed> {
    let status = response.status();
    read_chunks(response)
        .await
        .map_err(|source| Failed::Transport {
            status: Some(status),
            body: true,
            source,
        })
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
        // Read a little after the second it was written in: still whole seconds.
        let read_at = now + Duration::from_millis(1_297);
        assert_eq!(
            retry_after(&headers, read_at),
            Some(Duration::from_secs(89))
        );
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
        let cap = Cap::new(8, None);
        let held: Vec<_> = futures_util::future::join_all((0..3).map(|_| cap.acquire())).await;

        cap.throttled(None);

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
        cap.throttled(None);
        cap.throttled(None);
        cap.throttled(None);
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

    #[tokio::test]
    async fn a_retry_after_beyond_the_budget_gives_up_at_once_and_says_how_long() {
        let policy = RetryPolicy::default();
        let stats = Stats::default();
        let mut attempts = Attempts::new(
            "search page",
            "http://api.test/search",
            &policy,
            &stats,
            |e| Error::Upstream(e.to_string()),
        );

        let given_up = attempts
            .retry(
                Failed::Status(StatusCode::TOO_MANY_REQUESTS),
                Some(StatusCode::TOO_MANY_REQUESTS),
                Some(Duration::from_secs(86_400)),
            )
            .await
            .expect_err("beyond the budget");

        let message = given_up.to_string();
        assert!(
            message.contains("asked to wait 1day (Retry-After)"),
            "{message}"
        );
        assert!(
            message.contains("10m left of the retry budget"),
            "{message}"
        );
        assert_eq!(Stats::get(&stats.retries), 0);
    }
}

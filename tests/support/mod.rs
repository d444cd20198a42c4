//! What the end-to-end tests share: finding the services `./test` started, and bounded waits.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

/// The URL of a real service from its `QUIKAPP_*` variable. When it is unset the test is skipped
/// with a note, unless `QUIKAPP_REQUIRE_SERVICES=1` (as `./test` and CI set it), where a missing
/// service is a failure rather than a silent pass.
pub fn service_url(variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("QUIKAPP_REQUIRE_SERVICES").as_deref() == Ok("1") => {
            panic!("{variable} is not set; run the suite with ./test, which starts the services")
        }
        _ => {
            eprintln!("skipped: {variable} is not set (./test starts the services and sets it)");
            None
        }
    }
}

/// Runs `work` until it finishes or `limit` passes; `None` means it did not finish in time.
pub async fn deadline<T>(limit: Duration, work: impl Future<Output = T>) -> Option<T> {
    tokio::time::timeout(limit, work).await.ok()
}

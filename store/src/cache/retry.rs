//! Asking a busy server again: one policy for the network backends (REAPI's `RESOURCE_EXHAUSTED`
//! and `UNAVAILABLE`, a registry's 429 and 5xx).

use std::future::Future;
use std::time::Duration;

/// The pause before the first call made again; each later one doubles it.
const FIRST_PAUSE: Duration = Duration::from_millis(100);

/// `call()`'s answer, each call within `limit`, made again up to `retries` times after pauses
/// doubling from 100 ms while `busy` says the answer is a busy server's. None: a call got no
/// answer within `limit` (it is not made again).
pub(crate) async fn while_busy<T, E, Fut>(
    limit: Duration,
    retries: u32,
    busy: impl Fn(&E) -> bool,
    mut call: impl FnMut() -> Fut,
) -> Option<Result<T, E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = FIRST_PAUSE;
    for _ in 0..retries {
        match tokio::time::timeout(limit, call()).await {
            Ok(Err(e)) if busy(&e) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            answer => return answer.ok(),
        }
    }
    tokio::time::timeout(limit, call()).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_answers_are_asked_again_up_to_the_limit_and_no_further() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let calls = std::cell::Cell::new(0);
        let ask = |busy_for: u32| {
            calls.set(0);
            rt.block_on(while_busy(
                Duration::from_secs(1),
                3,
                |e: &u32| *e == 503,
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n <= busy_for {
                            Err(503u32)
                        } else {
                            Ok(n)
                        }
                    }
                },
            ))
        };
        assert_eq!(ask(2), Some(Ok(3)));
        assert_eq!(calls.get(), 3);
        // Three calls made again, then the fourth answer stands.
        assert_eq!(ask(9), Some(Err(503)));
        assert_eq!(calls.get(), 4);
        // Another error is not asked again.
        calls.set(0);
        let other = rt.block_on(while_busy(
            Duration::from_secs(1),
            3,
            |e: &u32| *e == 503,
            || {
                calls.set(calls.get() + 1);
                async { Err::<u32, u32>(404) }
            },
        ));
        assert_eq!((other, calls.get()), (Some(Err(404)), 1));
        // No answer within the limit: None, not asked again.
        calls.set(0);
        let slow = rt.block_on(while_busy(
            Duration::from_millis(50),
            3,
            |_: &u32| true,
            || {
                calls.set(calls.get() + 1);
                async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok::<u32, u32>(1)
                }
            },
        ));
        assert_eq!((slow, calls.get()), (None, 1));
    }
}

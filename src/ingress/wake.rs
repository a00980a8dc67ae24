//! Which of a session's sources woke it (issue 14). A session's `select!` polls each branch
//! every time its task is woken, though a wake-up comes from one source: after a turn's
//! answer the client's socket was polled for nothing (a tungstenite read that finds no
//! bytes, on the path between the answer's `send` and the thread's sleep), and a client's
//! frame polled the upstream's socket for nothing. A [`WakeFlag`] gates a branch: the branch's
//! future is polled only when the flag is raised, that is when a waker the future registered
//! fired since it last returned `Pending`, or when the session raised it itself (after
//! handling something that may have changed what the branch would read, see `ws::Session`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;

/// A flag raised by its own waker, which also wakes the task that last polled a [`Gated`].
pub(crate) struct WakeFlag {
    state: Arc<FlagState>,
    /// `state` as a waker, made once.
    waker: Waker,
}

struct FlagState {
    raised: AtomicBool,
    task: AtomicWaker,
}

impl Wake for FlagState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.raised.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl WakeFlag {
    /// A raised flag: the first poll goes through.
    pub(crate) fn new() -> WakeFlag {
        let state = Arc::new(FlagState {
            raised: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(state.clone());
        WakeFlag { state, waker }
    }

    /// The next [`WakeFlag::gate`] polls its future whether or not its waker fired.
    pub(crate) fn raise(&self) {
        self.state.raised.store(true, Ordering::Release);
    }

    /// `fut`, polled (with this flag's waker) only while the flag is raised.
    pub(crate) fn gate<F: Future>(&self, fut: F) -> Gated<'_, F> {
        Gated { flag: self, fut }
    }
}

pin_project_lite::pin_project! {
    /// A future polled through a [`WakeFlag`] (see [`WakeFlag::gate`]).
    pub(crate) struct Gated<'a, F> {
        flag: &'a WakeFlag,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Gated<'_, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        // Registered before the flag is read: a wake-up after the read still wakes the task.
        this.flag.state.task.register(cx.waker());
        if !this.flag.state.raised.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        this.fut.poll(&mut Context::from_waker(&this.flag.waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts its polls; `Ready` once `ready` is set, else `Pending` with the waker kept.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    struct CountWakes(AtomicUsize);
    impl Wake for CountWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_gated_future_is_polled_only_after_its_own_waker_fired_or_a_raise() {
        let flag = WakeFlag::new();
        let (polls, ready) = (
            Arc::new(AtomicUsize::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let kept = Arc::new(std::sync::Mutex::new(None::<Waker>));
        let mut gated = Box::pin(flag.gate(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: kept.clone(),
        }));
        let task = Arc::new(CountWakes(AtomicUsize::new(0)));
        let task_waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&task_waker);

        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1, "a new flag is raised");
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            polls.load(Ordering::SeqCst),
            1,
            "nothing woke it: not polled"
        );

        // The future's own waker fires: the task is woken and the next poll goes through.
        kept.lock().unwrap().take().unwrap().wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert!(gated.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2);

        // A raise lets one poll through without a wake-up.
        flag.raise();
        ready.store(true, Ordering::SeqCst);
        assert!(gated.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }
}

//! Helper threads for the kernels' work splits, started once and kept.
//!
//! Starting and joining a scoped thread costs tens of microseconds, about
//! what a mid-sized kernel takes; a training step runs hundreds of them.
//! Here helpers sleep on a condition variable between calls instead, after
//! watching for the next call for a moment: waking a sleeping thread costs
//! tens of microseconds on a virtual machine, and a step's kernels follow
//! each other faster than that.
//!
//! [`broadcast`] publishes one task (a closure borrowed from the caller),
//! runs it on the calling thread as well, then withdraws it and waits for
//! every helper that joined. Tasks drain a shared queue, so a helper that
//! joins late, or never, only changes who does the work. When the pool is
//! already serving a call (another executor thread, or a task that itself
//! splits), the caller simply runs its task alone.
//!
//! Input: a task and a thread count. Output: the task run on up to that
//! many threads. Invariant: which thread runs which piece never changes a
//! result: pieces are fixed by the caller, not by timing.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

/// A published task, its lifetime erased (see the SAFETY note in [`broadcast`]).
type Task = &'static (dyn Fn() + Sync);

/// How long an idle helper watches for the next task before it sleeps.
const WATCH: std::time::Duration = std::time::Duration::from_micros(100);

/// Most helpers ever started.
const MAX_HELPERS: usize = 255;

struct Pool {
    state: Mutex<State>,
    /// Tasks published so far: an idle helper watches it for a moment
    /// before it sleeps, so a kernel that follows soon after the last one
    /// does not pay for waking it.
    published: AtomicU64,
    /// Helpers wait here for a task.
    wake: Condvar,
    /// The caller waits here for helpers to leave the task.
    done: Condvar,
}

struct State {
    task: Option<Task>,
    /// Helpers that may still join the current task.
    seats: usize,
    /// Helpers inside the current task.
    running: usize,
    /// Helper threads started so far.
    helpers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        state: Mutex::new(State { task: None, seats: 0, running: 0, helpers: 0 }),
        published: AtomicU64::new(0),
        wake: Condvar::new(),
        done: Condvar::new(),
    })
}

fn lock(p: &Pool) -> MutexGuard<'_, State> {
    p.state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `task` on the calling thread and on up to `extra` helpers at once;
/// returns once every one of those calls has returned.
pub(super) fn broadcast(extra: usize, task: &(dyn Fn() + Sync)) {
    let p = pool();
    {
        let mut st = lock(p);
        if extra == 0 || st.task.is_some() || st.running > 0 {
            drop(st);
            task();
            return;
        }
        let want = extra.min(MAX_HELPERS);
        while st.helpers < want {
            match std::thread::Builder::new().name("shardplan-kernels".into()).spawn(helper) {
                Ok(_) => st.helpers += 1,
                // Fewer helpers only means less parallelism.
                Err(_) => break,
            }
        }
        // SAFETY: the reference is only used by helpers that take a seat
        // while it is published. `Withdraw` (below, also run on unwind)
        // unpublishes it and waits until no helper is inside it before this
        // function returns, so no use outlives the caller's borrow.
        let erased = unsafe { std::mem::transmute::<&(dyn Fn() + Sync), Task>(task) };
        st.task = Some(erased);
        st.seats = want.min(st.helpers);
        p.published.fetch_add(1, Ordering::Release);
        p.wake.notify_all();
    }
    let _withdraw = Withdraw(p);
    task();
}

/// Unpublishes the current task and waits for the helpers inside it.
struct Withdraw(&'static Pool);

impl Drop for Withdraw {
    fn drop(&mut self) {
        let mut st = lock(self.0);
        st.task = None;
        st.seats = 0;
        while st.running > 0 {
            st = self.0.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// A helper thread: joins published tasks while seats remain.
fn helper() {
    let p = pool();
    let mut st = lock(p);
    loop {
        match st.task {
            Some(task) if st.seats > 0 => {
                st.seats -= 1;
                st.running += 1;
                drop(st);
                // A panicking task must still be counted out, or the caller
                // would wait forever.
                let _ = catch_unwind(AssertUnwindSafe(task));
                st = lock(p);
                st.running -= 1;
                if st.running == 0 {
                    p.done.notify_all();
                }
            }
            _ => {
                // Watch for the next task a little while before sleeping:
                // a training step's kernels follow each other within
                // microseconds, and waking a sleeping thread costs about as
                // much as a small kernel.
                let seen = p.published.load(Ordering::Acquire);
                drop(st);
                let start = std::time::Instant::now();
                'watch: while p.published.load(Ordering::Acquire) == seen {
                    for _ in 0..64 {
                        std::hint::spin_loop();
                    }
                    if start.elapsed() > WATCH {
                        break 'watch;
                    }
                }
                st = lock(p);
                if st.task.is_none() || st.seats == 0 {
                    st = p.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }
}

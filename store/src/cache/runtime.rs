//! The small tokio runtime a network backend runs its requests on. The [`super::BinaryCache`]
//! trait is blocking, and may be called from any thread, including from inside another runtime's
//! tasks, where blocking on a runtime of one's own is not allowed: requests are spawned here and
//! waited for through a channel.

use std::future::Future;

pub(crate) struct ClientRuntime {
    /// Always `Some` until drop (dropped in the background: this may be dropped inside another
    /// runtime).
    rt: Option<tokio::runtime::Runtime>,
}

impl ClientRuntime {
    /// A runtime of two worker threads named `name`.
    pub(crate) fn new(name: &str) -> std::io::Result<ClientRuntime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(ClientRuntime { rt: Some(rt) })
    }

    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        self.rt.as_ref().expect("runtime lives until drop").handle()
    }

    /// Run `fut` here and wait for it from this (any) thread; `None` if the runtime stopped
    /// before it finished.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle().spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().ok()
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

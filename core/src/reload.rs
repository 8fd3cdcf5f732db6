//! A value read from files and read again when they change: certificates, the devices'
//! passwords, a JWKS. Checked on use, at most once a second, by modification time, so
//! an operator's edit (or a certificate renewal) takes effect without a restart and
//! without a file watcher thread. A change that does not load is logged and the last
//! good value stays in force.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// How often the files are checked for changes, at most.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

/// Reads the value from the files.
pub type Loader<T> = Box<dyn Fn(&[PathBuf]) -> Result<T, String> + Send + Sync>;

/// A value loaded from `files`, reloaded when any of their modification times changes.
pub struct Reloading<T> {
    what: &'static str,
    files: Vec<PathBuf>,
    load: Loader<T>,
    state: Mutex<State<T>>,
}

struct State<T> {
    value: Arc<T>,
    modified: Vec<Option<SystemTime>>,
    checked: Instant,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish()
    }
}

impl<T> Reloading<T> {
    /// Loads `what` (a name for the logs) from `files` now; an error if it does not load.
    pub fn new(what: &'static str, files: Vec<PathBuf>, load: Loader<T>) -> Result<Self, String> {
        let modified = modified(&files);
        let value = Arc::new(load(&files)?);
        Ok(Self {
            what,
            files,
            load,
            state: Mutex::new(State {
                value,
                modified,
                checked: Instant::now(),
            }),
        })
    }

    /// The value, read again first if a file changed since the last check (at most
    /// one check a second).
    pub fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.checked.elapsed() >= RECHECK_EVERY {
            state.checked = Instant::now();
            let now = modified(&self.files);
            if now != state.modified {
                state.modified = now;
                match (self.load)(&self.files) {
                    Ok(value) => {
                        tracing::info!(what = self.what, files = ?self.files, "re-read after a change");
                        state.value = Arc::new(value);
                    }
                    Err(error) => tracing::warn!(
                        what = self.what,
                        %error,
                        "changed but does not load; the last good one stays in force"
                    ),
                }
            }
        }
        state.value.clone()
    }
}

fn modified(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_file_is_read_again_and_a_bad_change_keeps_the_last_good_value() {
        let dir = std::env::temp_dir().join(format!("sluice-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("n");
        std::fs::write(&file, "1").unwrap();
        let load: Loader<u32> = Box::new(|files| {
            let text = std::fs::read_to_string(&files[0]).map_err(|e| e.to_string())?;
            text.trim().parse().map_err(|e| format!("{e}"))
        });
        let value = Reloading::new("number", vec![file.clone()], load).unwrap();
        assert_eq!(*value.current(), 1);
        let write = |text: &str, secs: u64| {
            std::fs::write(&file, text).unwrap();
            let f = std::fs::File::options().write(true).open(&file).unwrap();
            f.set_modified(SystemTime::now() + Duration::from_secs(secs))
                .unwrap();
        };
        write("2", 10);
        // The change is seen once a second has passed since the last check.
        value.state.lock().unwrap().checked -= RECHECK_EVERY;
        assert_eq!(*value.current(), 2);
        write("not a number", 20);
        value.state.lock().unwrap().checked -= RECHECK_EVERY;
        assert_eq!(
            *value.current(),
            2,
            "a bad change keeps the last good value"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

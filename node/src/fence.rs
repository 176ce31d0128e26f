//! Placeholder until the fencing watchdog lands (branch h-fence).
use std::time::Duration;

pub struct FenceDir;

impl FenceDir {
    pub fn write_lease(&self, _valid_for: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

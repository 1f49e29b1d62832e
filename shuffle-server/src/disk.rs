//! Disk space: every write must leave the configured reserve free on the data
//! dir's filesystem, and a full disk becomes an error that names the cause.

use std::path::Path;

use shuffle_protocol::{ErrorKind, ServiceError};

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(path)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Checks that writing `bytes` under `dir` leaves at least `reserve` bytes free.
pub fn check_reserve(dir: &Path, bytes: u64, reserve: u64) -> Result<(), ServiceError> {
    let available = available_bytes(dir).map_err(|e| io_error(dir, "checking free space of", e))?;
    if available < bytes.saturating_add(reserve) {
        return Err(ServiceError::new(
            ErrorKind::DiskFull,
            format!(
                "disk full: writing {bytes} bytes under {} would leave less than the reserve of {reserve} bytes \
                 free ({available} bytes available)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Turns an I/O error on `path` into a service error, naming a full disk as such.
pub fn io_error(path: &Path, doing: &str, e: std::io::Error) -> ServiceError {
    let full = [rustix::io::Errno::NOSPC.raw_os_error(), rustix::io::Errno::DQUOT.raw_os_error()];
    let kind =
        if e.raw_os_error().is_some_and(|code| full.contains(&code)) { ErrorKind::DiskFull } else { ErrorKind::Io };
    ServiceError::new(kind, format!("{doing} {}: {e}", path.display()))
}

/// Asks the kernel to read `len` bytes at `offset` of `file` ahead, so the
/// disk sees requests in the order the read scheduler chose. Advice only.
pub fn advise_will_need(file: &std::fs::File, offset: u64, len: u64) {
    let _ = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), rustix::fs::Advice::WillNeed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserve_larger_than_the_disk_is_reported_as_disk_full() {
        let dir = std::env::temp_dir();
        assert!(available_bytes(&dir).unwrap() > 0);
        assert!(check_reserve(&dir, 1, 0).is_ok());
        let err = check_reserve(&dir, 1, u64::MAX / 2).unwrap_err();
        assert_eq!(err.kind, ErrorKind::DiskFull);
        assert!(err.message.contains("disk full"), "{}", err.message);
    }

    #[test]
    fn enospc_maps_to_disk_full() {
        let e = std::io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error());
        assert_eq!(io_error(Path::new("/x"), "writing", e).kind, ErrorKind::DiskFull);
    }
}

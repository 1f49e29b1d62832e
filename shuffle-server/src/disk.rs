//! Disk space: a flush must leave the configured reserve free on the data
//! dir's filesystem, and a full disk becomes an error that names the cause.

use std::{ffi::CString, os::unix::ffi::OsStrExt, path::Path};

use shuffle_protocol::{ErrorKind, ServiceError};

/// Bytes available to unprivileged writers on the filesystem holding `path`.
pub fn available_bytes(path: &Path) -> std::io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statvfs writes only into the struct we pass, and `c_path` is a
    // valid NUL-terminated string that outlives the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
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
    let kind = if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        ErrorKind::DiskFull
    } else {
        ErrorKind::Io
    };
    ServiceError::new(kind, format!("{doing} {}: {e}", path.display()))
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
        let e = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert_eq!(io_error(Path::new("/x"), "writing", e).kind, ErrorKind::DiskFull);
    }
}

//! Whether a tray icon can be shown here, decided before touching the tray library.
//!
//! On Linux, Tauri's tray goes through libayatana-appindicator (or libappindicator), which is loaded
//! at run time; when it is missing the tray code panics, and without a session bus the icon has
//! nowhere to go. The app checks both first and, when either is missing, keeps the dashboard window
//! and says why there is no tray. macOS always has a menu bar.

/// Why there is no tray, or `None` when one can be created.
/// `os` is `std::env::consts::OS`; `has_session_bus` whether `DBUS_SESSION_BUS_ADDRESS` is set;
/// `indicator_library` the appindicator library that could be loaded, if any.
pub fn unavailable_reason(os: &str, has_session_bus: bool, indicator_library: Option<&str>) -> Option<String> {
    match os {
        "macos" | "windows" => None,
        _ if indicator_library.is_none() => Some(format!(
            "the tray library is not installed (one of {}; on Debian/Ubuntu: apt install libayatana-appindicator3-1)",
            INDICATOR_LIBRARIES.join(", ")
        )),
        _ if !has_session_bus => Some("no D-Bus session bus (DBUS_SESSION_BUS_ADDRESS is not set), so no tray host can be reached".into()),
        _ => None,
    }
}

/// The shared objects Tauri's Linux tray can load, in its order of preference.
pub const INDICATOR_LIBRARIES: [&str; 2] = ["libayatana-appindicator3.so.1", "libappindicator3.so.1"];

/// The first appindicator library that the dynamic loader can open (Linux); opened and closed again.
#[cfg(target_os = "linux")]
pub fn find_indicator_library() -> Option<&'static str> {
    INDICATOR_LIBRARIES.into_iter().find(|name| {
        let cname = std::ffi::CString::new(*name).expect("no NUL in library names");
        // SAFETY: dlopen/dlclose with a valid C string; RTLD_LAZY resolves nothing up front, and the
        // handle is closed at once (Tauri's tray loads its own).
        unsafe {
            let handle = libc::dlopen(cname.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if handle.is_null() {
                false
            } else {
                libc::dlclose(handle);
                true
            }
        }
    })
}

#[cfg(not(target_os = "linux"))]
pub fn find_indicator_library() -> Option<&'static str> {
    None
}

/// This process's answer: `None` when the tray may be created.
pub fn check() -> Option<String> {
    let bus = std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some_and(|v| !v.is_empty());
    unavailable_reason(std::env::consts::OS, bus, find_indicator_library())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macos_always_has_a_menu_bar() {
        assert_eq!(unavailable_reason("macos", false, None), None);
    }

    #[test]
    fn linux_needs_the_library_and_a_bus() {
        assert_eq!(unavailable_reason("linux", true, Some("libayatana-appindicator3.so.1")), None);
        let no_lib = unavailable_reason("linux", true, None).unwrap();
        assert!(no_lib.contains("libayatana-appindicator3.so.1"), "{no_lib}");
        let no_bus = unavailable_reason("linux", false, Some("libayatana-appindicator3.so.1")).unwrap();
        assert!(no_bus.contains("DBUS_SESSION_BUS_ADDRESS"), "{no_bus}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_installed_library_is_found() {
        // scripts/setup.d/40-app.sh installs libayatana-appindicator3-dev, which brings the .so.1.
        assert_eq!(find_indicator_library(), Some("libayatana-appindicator3.so.1"));
    }
}

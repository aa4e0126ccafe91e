//! A `.npy` file around any header text: for tests that feed the CLI's reader hostile headers
//! (shared by tests/hostile_cli.rs and the reader's unit tests in src/bin/cli/npy_tests.rs).

/// A version 1.0 file with this header text (padded with spaces and a newline to a multiple of
/// 64 bytes, as numpy pads) followed by `data`.
pub fn npy_raw(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h);
    out.extend(data);
    out
}

//! Unit tests and the fuzz test of the `.npy` reader.

use super::*;
use proptest::prelude::*;
use std::time::{Duration, Instant};

#[path = "../../../tests/common/npy_raw.rs"]
mod npy_raw;
use npy_raw::npy_raw as npy_bytes;

/// A folder of one test's (or one case's) own under the temporary one, removed when dropped.
struct Dir(std::path::PathBuf);

impl std::ops::Deref for Dir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir() -> Dir {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("fwl-npy-unit-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn read_bytes(name: &str, bytes: &[u8], accept: &[Elem]) -> Result<Npy, NpyError> {
    let d = dir();
    let p = d.join(name);
    std::fs::write(&p, bytes).unwrap();
    read_npy(&p, accept)
}

const ALL: [Elem; 4] = [Elem::F32, Elem::F16, Elem::I64, Elem::I32];

#[test]
fn reads_what_npyz_writes_in_both_byte_orders() {
    use npyz::WriterBuilder;
    let d = dir();
    let p = d.join("w.npy");
    let data: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
    let f = File::create(&p).unwrap();
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&[2, 3, 5]).writer(f).begin_nd().unwrap();
    w.extend(data.iter().copied()).unwrap();
    w.finish().unwrap();
    let a = read_npy(&p, &ALL).unwrap();
    assert_eq!(a, Npy { dims: vec![2, 3, 5], data: NpyData::F32(data.clone()) });
    let be: Vec<u8> = data.iter().flat_map(|x| x.to_be_bytes()).collect();
    let b =
        read_bytes("be.npy", &npy_bytes("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3, 5), }", &be), &ALL);
    assert_eq!(b.unwrap(), a);
    let ids: Vec<u8> = [7i64, -1].iter().flat_map(|x| x.to_le_bytes()).collect();
    // a list instead of a tuple, double quotes, Python 2 longs, no trailing comma
    let h = "{\"shape\": [1L, 2L], \"fortran_order\": False, \"descr\": \"<i8\"}";
    let c = read_bytes("ids.npy", &npy_bytes(h, &ids), &[Elem::I64]).unwrap();
    assert_eq!(c, Npy { dims: vec![1, 2], data: NpyData::I64(vec![7, -1]) });
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn refuses_with_typed_errors() {
    let ok = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
    let eight = [0u8; 8];
    type Expect = fn(&NpyError) -> bool;
    let cases: Vec<(Vec<u8>, Expect)> = vec![
        (b"junk".to_vec(), |e| matches!(e, NpyError::Magic)),
        (b"\x93NUMPY\x04\x00\x00\x00".to_vec(), |e| matches!(e, NpyError::Version(4, 0))),
        (b"\x93NUMPY\x02\x00\xff\xff\xff\x7f".to_vec(), |e| matches!(e, NpyError::HeaderTooLarge { .. })),
        (npy_bytes(ok, &eight[..7]), |e| matches!(e, NpyError::DataSize { expected: 8, got: 7 })),
        (npy_bytes(ok, &[0; 9]), |e| matches!(e, NpyError::DataSize { expected: 8, got: 9 })),
        (npy_bytes(&ok.replace("False", "True"), &eight), |e| matches!(e, NpyError::FortranOrder)),
        (npy_bytes(&ok.replace("<f4", "<f8"), &eight), |e| matches!(e, NpyError::Dtype { .. })),
        (npy_bytes(&ok.replace("'shape': (2,), ", ""), &eight), |e| matches!(e, NpyError::MissingKey("shape"))),
        (npy_bytes(&ok.replace("'shape'", "'shape': (2,), 'shape'"), &eight), |e| matches!(e, NpyError::BadKey(_))),
        (npy_bytes(&ok.replace("(2,)", "(4294967296, 4294967296, 4294967296)"), &eight), |e| {
            matches!(e, NpyError::ShapeOverflow(_))
        }),
        (npy_bytes(&ok.replace("(2,)", "(99999999999999999999,)"), &eight), |e| {
            matches!(e, NpyError::HeaderSyntax { .. })
        }),
        (npy_bytes(&ok.replace("'<f4'", "[('a', '<f4')]"), &eight), |e| {
            matches!(e, NpyError::HeaderNesting { max: 2, .. })
        }),
        (npy_bytes(&format!("{}{}", "[".repeat(26), "]".repeat(26)), &[]), |e| {
            matches!(e, NpyError::HeaderNesting { .. })
        }),
    ];
    for (i, (bytes, want)) in cases.iter().enumerate() {
        match read_bytes(&format!("case{i}.npy"), bytes, &[Elem::F32]) {
            Err(e) => assert!(want(&e), "case {i}: unexpected error {e}"),
            Ok(a) => panic!("case {i}: read {a:?}"),
        }
    }
    let d = dir();
    assert!(matches!(read_npy(&d, &ALL), Err(NpyError::NotAFile)));
    assert!(matches!(read_npy(&d.join("missing.npy"), &ALL), Err(NpyError::Io(_))));
}

/// Random bytes, random headers over the header's alphabet, mutations of valid files, and
/// valid files; with whether the file is valid.
fn hostile_file() -> impl Strategy<Value = (Vec<u8>, bool)> {
    let valid = (1u64..4, 1u64..4, 0usize..4).prop_map(|(a, b, t)| {
        let (descr, size) = [("<f4", 4), ("<f2", 2), ("<i8", 8), (">i4", 4)][t];
        let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({a}, {b}), }}");
        npy_bytes(&h, &vec![0x3c; (a * b) as usize * size])
    });
    let token = prop::sample::select(vec![
        "{",
        "}",
        "(",
        ")",
        "[",
        "]",
        ",",
        ":",
        " ",
        "'",
        "\"",
        "'descr'",
        "'shape'",
        "'fortran_order'",
        "True",
        "False",
        "'<f4'",
        "'<i8'",
        "0",
        "7",
        "18446744073709551616",
        "L",
        "\\",
        "\n",
    ]);
    let random_header = (prop::collection::vec(token, 0..200), prop::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(t, data)| npy_bytes(&t.concat(), &data));
    let mutated = (valid.clone(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6)).prop_map(
        |(mut f, edits)| {
            for (i, b) in edits {
                let at = i.index(f.len());
                f[at] = b;
            }
            f
        },
    );
    let truncated = (valid.clone(), any::<prop::sample::Index>()).prop_map(|(f, i)| f[..i.index(f.len())].to_vec());
    let deep = (1usize..2000, prop::sample::select(vec!["(", "[", "{"]))
        .prop_map(|(n, b)| npy_bytes(&format!("{{'shape': {}", b.repeat(n)), &[]));
    let bad = prop_oneof![prop::collection::vec(any::<u8>(), 0..300), random_header, mutated, truncated, deep];
    prop_oneof![4 => bad.prop_map(|f| (f, false)), 1 => valid.prop_map(|f| (f, true))]
}

proptest! {
    #![proptest_config(ProptestConfig {
        // FWL_TEST_CASES: a longer campaign, as the integration tests' randomised cases
        cases: match std::env::var("FWL_TEST_CASES") {
            Ok(s) => s.parse().unwrap_or_else(|_| panic!("FWL_TEST_CASES={s:?}: not a count of cases")),
            Err(_) => 400,
        },
        ..ProptestConfig::default()
    })]
    #[test]
    fn any_file_is_read_or_refused_quickly((bytes, valid) in hostile_file()) {
        let d = dir();
        let p = d.join("fuzz.npy");
        std::fs::write(&p, &bytes).unwrap();
        let t = Instant::now();
        let r = read_npy(&p, &ALL);
        let took = t.elapsed();
        drop(d);
        prop_assert!(r.is_ok() || !valid, "a valid file was refused: {:?}", r.err());
        // a watchdog, not a speed target (those live in the benches): a 26-deep header once
        // took over a minute
        prop_assert!(took < Duration::from_secs(10), "took {took:?}");
        if let Ok(a) = r {
            let n: usize = a.dims.iter().product();
            let len = match &a.data {
                NpyData::F32(v) => v.len(),
                NpyData::F16(v) => v.len(),
                NpyData::I64(v) => v.len(),
                NpyData::I32(v) => v.len(),
            };
            prop_assert_eq!(n, len);
        }
    }
}

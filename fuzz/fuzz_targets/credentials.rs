#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    s2s_proxy::fuzzing::credentials(data);
});

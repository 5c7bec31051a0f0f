//! Fuzz target `settings`: see `checks::settings`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::settings(data);
    });
}

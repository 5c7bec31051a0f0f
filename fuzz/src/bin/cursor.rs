//! Fuzz target `cursor`: see `checks::cursor`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::cursor(data);
    });
}

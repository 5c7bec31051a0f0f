//! Fuzz target `grants`: see `checks::grants`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::grants(data);
    });
}

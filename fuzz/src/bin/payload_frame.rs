//! Fuzz target `payload_frame`: see `checks::payload_frame`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::payload_frame(data);
    });
}

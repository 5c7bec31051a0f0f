//! Fuzz target `request_token`: see `checks::request_token`.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        sse_gateway_fuzz::checks::request_token(data);
    });
}

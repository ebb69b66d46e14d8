//! The `wsd` binary: the library's command line with the built-in apps, driven by
//! `workers.toml`.

fn main() {
    wsd::Runner::new().run()
}

fn main() {
    // Embeds tauri.conf.json, the capabilities and ../ui/src into the binary; writes gen/schemas/.
    tauri_build::build()
}

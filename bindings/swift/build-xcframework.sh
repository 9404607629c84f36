#!/usr/bin/env bash
# Builds the Swift package's binary part on macOS (Xcode and rustup installed):
#   - the Rust static library for iOS devices, the iOS simulator (arm64 + x86_64) and macOS
#     (arm64 + x86_64), with the size-tuned `mobile` profile;
#   - VaneFFIFFI.xcframework from those libraries and the generated C header and module map;
#   - Sources/VaneFFI/VaneFFI.swift, the generated Swift bindings.
# Then `swift build` / Xcode uses Package.swift as usual. (It cannot run on the Linux development
# machine; `check` verifies there what can be verified without a Swift compiler.)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$here/build"
cd "$root"

targets=(aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios aarch64-apple-darwin x86_64-apple-darwin)
rustup target add "${targets[@]}"
for target in "${targets[@]}"; do
  cargo build --locked --profile mobile -p vane-ffi --features mobile --target "$target"
done

# Bindings are generated from a host build of the same library (UniFFI library mode).
cargo build --locked -p vane-ffi -p uniffi-bindgen
rm -rf "$out" && mkdir -p "$out/headers/VaneFFIFFI" "$out/ios-sim" "$out/macos"
"$root/target/debug/uniffi-bindgen" generate --library "$root/target/debug/libvane_ffi.dylib" \
  --language swift --out-dir "$out/gen"
# The header and module map go in a folder of their own (Headers/VaneFFIFFI/module.modulemap), not
# flat in Headers/: Xcode copies every xcframework's Headers into one include directory, where two
# flat module.modulemap files from different frameworks would collide.
cp "$out/gen/VaneFFIFFI.h" "$out/headers/VaneFFIFFI/"
cp "$out/gen/VaneFFIFFI.modulemap" "$out/headers/VaneFFIFFI/module.modulemap"
cp "$out/gen/VaneFFI.swift" "$here/Sources/VaneFFI/VaneFFI.swift"

lib() { echo "$root/target/$1/mobile/libvane_ffi.a"; }
lipo -create "$(lib aarch64-apple-ios-sim)" "$(lib x86_64-apple-ios)" -output "$out/ios-sim/libvane_ffi.a"
lipo -create "$(lib aarch64-apple-darwin)" "$(lib x86_64-apple-darwin)" -output "$out/macos/libvane_ffi.a"

rm -rf "$here/VaneFFIFFI.xcframework"
xcodebuild -create-xcframework \
  -library "$(lib aarch64-apple-ios)" -headers "$out/headers" \
  -library "$out/ios-sim/libvane_ffi.a" -headers "$out/headers" \
  -library "$out/macos/libvane_ffi.a" -headers "$out/headers" \
  -output "$here/VaneFFIFFI.xcframework"
# The zip a release publishes, and the checksum Package.swift's remote binary target needs.
(cd "$here" && rm -f VaneFFIFFI.xcframework.zip && zip -qry VaneFFIFFI.xcframework.zip VaneFFIFFI.xcframework)
echo "built $here/VaneFFIFFI.xcframework and Sources/VaneFFI/VaneFFI.swift"
echo "release: upload VaneFFIFFI.xcframework.zip; its checksum: $(cd "$here" && swift package compute-checksum VaneFFIFFI.xcframework.zip)"

// swift-tools-version:5.9
// The Vane SDK for iOS and macOS. `build-xcframework.sh` (on macOS) builds the Rust library for
// the Apple targets into VaneFFIFFI.xcframework and generates Sources/VaneFFI/VaneFFI.swift;
// then this package builds as usual (Xcode: File > Add Package Dependencies > Add Local).
import PackageDescription

let package = Package(
    name: "Vane",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Vane", targets: ["Vane"]),
    ],
    targets: [
        .binaryTarget(name: "VaneFFIFFI", path: "VaneFFIFFI.xcframework"),
        .target(name: "VaneFFI", dependencies: ["VaneFFIFFI"], path: "Sources/VaneFFI"),
        .target(name: "Vane", dependencies: ["VaneFFI"], path: "Sources/Vane"),
        .testTarget(name: "VaneTests", dependencies: ["Vane"], path: "Tests/VaneTests"),
    ]
)

// swift-tools-version:5.9
// The Vane SDK for iOS and macOS. `build-xcframework.sh` (on macOS) builds the Rust library for
// the Apple targets into VaneFFIFFI.xcframework and generates Sources/VaneFFI/VaneFFI.swift;
// then this package builds as usual (Xcode: File > Add Package Dependencies > Add Local).
//
// A release points the binary target at the published xcframework instead: set VANE_XCFRAMEWORK_URL
// and VANE_XCFRAMEWORK_CHECKSUM (`swift package compute-checksum VaneFFIFFI.xcframework.zip`) in
// the environment of the build that resolves the package, or edit the two constants below in the
// released copy of this file.
import Foundation
import PackageDescription

let releasedURL = ProcessInfo.processInfo.environment["VANE_XCFRAMEWORK_URL"]
let releasedChecksum = ProcessInfo.processInfo.environment["VANE_XCFRAMEWORK_CHECKSUM"]

let ffiBinary: Target
if let url = releasedURL, let checksum = releasedChecksum {
    ffiBinary = .binaryTarget(name: "VaneFFIFFI", url: url, checksum: checksum)
} else {
    ffiBinary = .binaryTarget(name: "VaneFFIFFI", path: "VaneFFIFFI.xcframework")
}

let package = Package(
    name: "Vane",
    platforms: [.iOS(.v15), .macOS(.v12)],
    products: [
        .library(name: "Vane", targets: ["Vane"]),
    ],
    targets: [
        ffiBinary,
        .target(name: "VaneFFI", dependencies: ["VaneFFIFFI"], path: "Sources/VaneFFI"),
        .target(name: "Vane", dependencies: ["VaneFFI"], path: "Sources/Vane"),
        .testTarget(name: "VaneTests", dependencies: ["Vane"], path: "Tests/VaneTests"),
    ]
)

// An AAR holding the Kotlin layer (../src/main/kotlin), the UniFFI bindings generated from the
// Rust library, and the library itself for each ABI in jniLibs, built with cargo-ndk and the
// size-tuned `mobile` profile. Shaped like Mozilla application-services' packaging: the Rust
// build is a Gradle task the AAR depends on, JNA comes as a declared @aar dependency, and the
// consumer R8 rules keep what JNA reaches by reflection.
plugins {
    id("com.android.library") version "8.7.3"
    id("org.jetbrains.kotlin.android") version "2.1.0"
}

val repo = rootDir.resolve("../../..").canonicalFile
val abis = listOf("arm64-v8a", "armeabi-v7a", "x86_64")
val rustOut = layout.buildDirectory.dir("rustJniLibs")
val generated = layout.buildDirectory.dir("generated/uniffi")

android {
    namespace = "dev.vane.sdk"
    compileSdk = 35
    defaultConfig {
        minSdk = 24
        consumerProguardFiles("consumer-rules.pro")
        ndk { abiFilters += abis }
    }
    sourceSets["main"].apply {
        kotlin.srcDirs("src/main/kotlin", repo.resolve("bindings/kotlin/src/main/kotlin"), generated)
        jniLibs.srcDir(rustOut)
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    packaging {
        // Stored uncompressed and page-aligned, so the loader maps it in place (Android 15's
        // 16 KB pages included: the library is linked with max-page-size=16384 below).
        jniLibs.useLegacyPackaging = false
    }
}

// The Kotlin half of rustls-platform-verifier (Android's trust store, see VaneAndroid.kt), from
// its project's Maven archive (settings.gradle.kts), at exactly the version of the
// `rustls-platform-verifier-android` crate in Cargo.lock: the native and Kotlin halves must match.
val verifierVersion: String = repo.resolve("Cargo.lock").readLines().let { lines ->
    val at = lines.indexOfFirst { it.trim() == "name = \"rustls-platform-verifier-android\"" }
    check(at >= 0) { "rustls-platform-verifier-android is not in Cargo.lock" }
    lines[at + 1].substringAfter('"').substringBefore('"')
}

dependencies {
    implementation("net.java.dev.jna:jna:5.14.0@aar")
    implementation("org.jetbrains.kotlinx:kotlinx-coroutines-android:1.9.0")
    implementation("rustls:rustls-platform-verifier:$verifierVersion")
}

// The Rust library per ABI: `cargo install cargo-ndk` and `rustup target add
// aarch64-linux-android armv7-linux-androideabi x86_64-linux-android` once; ANDROID_NDK_HOME set.
val cargoNdk by tasks.registering(Exec::class) {
    workingDir = repo
    environment("RUSTFLAGS", "-C link-arg=-Wl,-z,max-page-size=16384")
    commandLine(
        listOf("cargo", "ndk") + abis.flatMap { listOf("-t", it) } +
            listOf("-o", rustOut.get().asFile.path, "build", "--locked", "--profile", "mobile",
                "-p", "vane-ffi", "--features", "mobile"),
    )
}

// The Kotlin bindings, generated in library mode from a host build of the same library.
val uniffiBindings by tasks.registering(Exec::class) {
    workingDir = repo
    val hostLib = repo.resolve("target/debug/libvane_ffi.so")
    commandLine(
        "sh", "-c",
        "cargo build --locked -p vane-ffi -p uniffi-bindgen && " +
            "target/debug/uniffi-bindgen generate --library $hostLib --language kotlin " +
            "--out-dir ${generated.get().asFile.path} --no-format",
    )
}

tasks.named("preBuild") { dependsOn(cargoNdk, uniffiBindings) }

// The Vane SDK as an Android library (AAR). See README.md; nothing here builds on the Linux
// development machine (it has no Android SDK), so it is kept small and plain.
pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositories {
        google()
        mavenCentral()
        // The Kotlin half of rustls-platform-verifier (build.gradle.kts).
        maven { url = uri("https://github.com/rustls/rustls-platform-verifier/raw/maven-archive/android-release-support/maven/") }
    }
}
rootProject.name = "vane-android"

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
    }
}
rootProject.name = "vane-android"

"""The emulated physical network that the tests, the benchmarks and the soak build on.

Why a package of its own (not under tests/): `make bench` and the tests set up the same underlay
bridge, ToR switch, router namespaces and ipamd processes; both import it as `testbed.netbed`
instead of one reaching into the other's folder. Not part of the product: never packaged.
"""

// A check for fuzz targets that works without assertions enabled: prints what failed and aborts,
// so that libFuzzer (or the corpus replay) records the input as a crash.
#ifndef DHSA_TESTS_FUZZ_FUZZ_CHECK_H_
#define DHSA_TESTS_FUZZ_FUZZ_CHECK_H_

#include <cstdio>
#include <cstdlib>

#define DHSA_FUZZ_CHECK(cond)                                                            \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: fuzz check failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                      \
    }                                                                                    \
  } while (0)

#endif  // DHSA_TESTS_FUZZ_FUZZ_CHECK_H_

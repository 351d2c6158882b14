// This machine's f32 FMA peak (issue #25, "toward the hardware's limit"): per thread, 12
// independent 8-wide FMA chains (enough to hide the latency of two FMA pipes), on N threads.
//   gcc -O3 -march=native -pthread tools/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak 2
// (-O2 without -march=native spills the chains and reports half.)
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#define ITERS 200000000L
static void *run(void *out) {
  __m256 a[12], b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(0.001f);
  for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps((float)i);
  for (long n = 0; n < ITERS; n++)
    for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
  float s = 0; float t[8];
  for (int i = 0; i < 12; i++) { _mm256_storeu_ps(t, a[i]); s += t[0]; }
  *(float *)out = s;
  return 0;
}
int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1;
  pthread_t th[64]; float out[64];
  struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < n; i++) pthread_create(&th[i], 0, run, &out[i]);
  for (int i = 0; i < n; i++) pthread_join(th[i], 0);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
  printf("%d thread(s): %.1f G FMA/s (%.1f GFLOP/s), checksum %g\n", n, n * ITERS * 12.0 * 8 / s / 1e9, 2 * n * ITERS * 12.0 * 8 / s / 1e9, out[0]);
  return 0;
}

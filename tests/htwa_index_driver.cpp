// Test driver for csrc/htwa_geometry.h (compiled with g++ by tests/test_htwa_index.py; no torch, no CUDA).
//
// usage: htwa_index_driver T H W  Wt Wh Ww  st sh sw  Bt Bh Bw
// prints, one item per line:
//   boxes <axis> <start> <size> <c0>       every box along each axis
//   nbox <total> nwin <N>
//   rows <N*N row numbers, n_q-major>
//   offsets <rows+1 numbers>
//   pairs <N*N numbers>
//   roundtrip <tokens checked> <failures>  box_token / window_to_box_local agree for every token of every box
//   coverage <tokens> <failures>           every grid token is in exactly one box
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "htwa_geometry.h"

using namespace lfvila::htwa;

int main(int argc, char** argv) {
  if (argc != 13) {
    std::fprintf(stderr, "usage: %s T H W Wt Wh Ww st sh sw Bt Bh Bw\n", argv[0]);
    return 2;
  }
  int v[12];
  for (int i = 0; i < 12; ++i) v[i] = std::atoi(argv[i + 1]);
  const Geometry g = make_geometry(v, v + 3, v + 6, v + 9);
  for (int a = 0; a < 3; ++a)
    for (int j = 0; j < g.nbox[a]; ++j) {
      int start, n, c0;
      axis_box(g.grid[a], g.win[a], g.shift[a], j, &start, &n, &c0);
      std::printf("boxes %d %d %d %d\n", a, start, n, c0);
    }
  std::printf("nbox %d nwin %d\n", g.nbox_total, g.nwin);
  std::printf("rows");
  for (int q = 0; q < g.nwin; ++q)
    for (int k = 0; k < g.nwin; ++k) std::printf(" %d", bias_row(g, q, k));
  std::printf("\n");
  std::vector<int32_t> offsets, pairs;
  build_bias_inverse(g, &offsets, &pairs);
  std::printf("offsets");
  for (int32_t x : offsets) std::printf(" %d", x);
  std::printf("\npairs");
  for (int32_t x : pairs) std::printf(" %d", x);
  std::printf("\n");

  long checked = 0, failures = 0;
  std::vector<int> seen(static_cast<size_t>(g.grid[0]) * g.grid[1] * g.grid[2], 0);
  for (int box = 0; box < g.nbox_total; ++box) {
    const Box b = decode_box(g, box);
    for (int i = 0; i < b.count; ++i) {
      int t, h, w, n;
      box_token(g, b, i, &t, &h, &w, &n);
      ++checked;
      const bool in_grid = t >= 0 && t < g.grid[0] && h >= 0 && h < g.grid[1] && w >= 0 && w < g.grid[2];
      // the in-window coordinate of each axis must be (x - shift) mod window
      const int ct = ((t - g.shift[0]) % g.win[0] + g.win[0]) % g.win[0];
      const int ch = ((h - g.shift[1]) % g.win[1] + g.win[1]) % g.win[1];
      const int cw = ((w - g.shift[2]) % g.win[2] + g.win[2]) % g.win[2];
      const bool n_ok = n == (ct * g.win[1] + ch) * g.win[2] + cw;
      if (!in_grid || !n_ok || window_to_box_local(g, b, n) != i) ++failures;
      if (in_grid) ++seen[(static_cast<size_t>(t) * g.grid[1] + h) * g.grid[2] + w];
    }
    // window indices not in the box must map to -1
    int present = 0;
    for (int n = 0; n < g.nwin; ++n) present += window_to_box_local(g, b, n) >= 0;
    if (present != b.count) ++failures;
  }
  std::printf("roundtrip %ld %ld\n", checked, failures);
  long bad = 0;
  for (int x : seen) bad += x != 1;
  std::printf("coverage %zu %ld\n", seen.size(), bad);
  return 0;
}

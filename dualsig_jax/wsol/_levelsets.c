/* Per-level contour IoUs of a quantized score map, from union-find component trees.
 *
 * Loaded by dualsig_jax/wsol/native.py (ctypes); the facts it relies on are listed in that
 * module's docstring. For every level i of the caller (level i keeps the pixels whose level
 * index v > i) one call writes:
 *   multi[i]          best IoU over the boxes of all contours (outer borders of the 8-connected
 *                     foreground components, hole borders of the 4-connected background
 *                     components that do not reach the image border) and all GT boxes;
 *   largest[i]        best IoU of the largest contour's box (largest cv2.contourArea), and
 *   largest_first[i]  its IoU with the first GT box;
 *   flags[i]          bit 0: several contours share the largest area (resolved here in
 *                     OpenCV's order, see below); bit 1: the level has no contour.
 * Forests are built by adding the pixels one level after the other (union-find), on a grid
 * padded by one pixel so that neighbours need no bounds checks:
 *   e: the lowest level at which each pixel is background connected to the outside, by a flood
 *      from the border in level order; e == v everywhere iff no level has a hole;
 *   filled forest: components of e > i (8-connected, levels falling), i.e. the components with
 *      their holes filled, with 2 * contour area per component (see the window rule below);
 *   only if some level has a hole: foreground forest (v > i, 8-connected) and hole forest
 *      (v <= i < e, 4-connected).
 */
#include <stdint.h>
#include <stdlib.h>

typedef struct {
  int32_t *parent; /* -1: not added yet; padding pixels are never added */
  int32_t *size;
  int16_t *x0, *y0, *x1, *y1; /* inclusive box of a root's set, image coordinates */
  int32_t *area;              /* 2 * contour area of a root's filled component, or NULL */
  int32_t *first;             /* with area: lowest (raster-first) pixel of a root's set */
  double *score;              /* cached best IoU of a root's box */
  uint8_t *dirty;             /* the box changed since score was computed */
  int32_t *roots;             /* roots listed for reporting, in any order */
  int32_t *pos;               /* index of a root in roots, -1 if not listed */
  int32_t num_roots;
} forest;

static int forest_init(forest *f, int32_t n, int with_area) {
  f->parent = malloc(sizeof(int32_t) * n);
  f->size = malloc(sizeof(int32_t) * n);
  f->x0 = malloc(sizeof(int16_t) * n);
  f->y0 = malloc(sizeof(int16_t) * n);
  f->x1 = malloc(sizeof(int16_t) * n);
  f->y1 = malloc(sizeof(int16_t) * n);
  f->score = malloc(sizeof(double) * n);
  f->dirty = malloc(n);
  f->roots = malloc(sizeof(int32_t) * n);
  f->pos = malloc(sizeof(int32_t) * n);
  f->area = with_area ? malloc(sizeof(int32_t) * n) : NULL;
  f->first = with_area ? malloc(sizeof(int32_t) * n) : NULL;
  f->num_roots = 0;
  if (!f->parent || !f->size || !f->x0 || !f->y0 || !f->x1 || !f->y1 || !f->score ||
      !f->dirty || !f->roots || !f->pos || (with_area && (!f->area || !f->first)))
    return -1;
  for (int32_t i = 0; i < n; i++) f->parent[i] = -1;
  return 0;
}

static void forest_free(forest *f) {
  free(f->parent);
  free(f->size);
  free(f->x0);
  free(f->y0);
  free(f->x1);
  free(f->y1);
  free(f->score);
  free(f->dirty);
  free(f->roots);
  free(f->pos);
  free(f->area);
  free(f->first);
}

static inline int32_t find(int32_t *parent, int32_t p) {
  while (parent[p] != p) {
    parent[p] = parent[parent[p]]; /* path halving */
    p = parent[p];
  }
  return p;
}

static inline void unlist(forest *f, int32_t r) {
  int32_t i = f->pos[r];
  if (i < 0) return;
  int32_t last = f->roots[--f->num_roots];
  f->roots[i] = last;
  f->pos[last] = i;
  f->pos[r] = -1;
}

/* Joins the sets of roots ra != rb; returns the new root. It stays listed only if both were
   (the outside node's set is never listed). */
static int32_t link(forest *f, int32_t ra, int32_t rb) {
  if (f->size[ra] < f->size[rb]) {
    int32_t t = ra;
    ra = rb;
    rb = t;
  }
  int listed = f->pos[ra] >= 0 && f->pos[rb] >= 0;
  f->parent[rb] = ra;
  f->size[ra] += f->size[rb];
  if (f->x0[rb] < f->x0[ra]) f->x0[ra] = f->x0[rb];
  if (f->y0[rb] < f->y0[ra]) f->y0[ra] = f->y0[rb];
  if (f->x1[rb] > f->x1[ra]) f->x1[ra] = f->x1[rb];
  if (f->y1[rb] > f->y1[ra]) f->y1[ra] = f->y1[rb];
  if (f->area) {
    f->area[ra] += f->area[rb];
    if (f->first[rb] < f->first[ra]) f->first[ra] = f->first[rb];
  }
  f->dirty[ra] = 1;
  unlist(f, rb);
  if (!listed) unlist(f, ra);
  return ra;
}

/* Makes padded pixel p at image (x, y) a member of root r (-1: a new component). */
static void attach(forest *f, int32_t p, int16_t x, int16_t y, int32_t r) {
  if (r < 0) {
    f->parent[p] = p;
    f->size[p] = 1;
    f->x0[p] = f->x1[p] = x;
    f->y0[p] = f->y1[p] = y;
    if (f->area) f->area[p] = 0, f->first[p] = p;
    f->dirty[p] = 1;
    f->pos[p] = f->num_roots;
    f->roots[f->num_roots++] = p;
    return;
  }
  f->parent[p] = r;
  f->size[r]++;
  if (f->first && p < f->first[r]) f->first[r] = p; /* padded indices follow raster order */
  if (x < f->x0[r]) f->x0[r] = x, f->dirty[r] = 1;
  if (x > f->x1[r]) f->x1[r] = x, f->dirty[r] = 1;
  if (y < f->y0[r]) f->y0[r] = y, f->dirty[r] = 1;
  if (y > f->y1[r]) f->y1[r] = y, f->dirty[r] = 1;
}

/* Adds p joined to its already added 8-neighbours. off8 lists the neighbours around the ring
   (each one 8-adjacent to the next), and two added neighbours that are 8-adjacent are in one
   set already: one find per run of added neighbours along the ring is enough. */
static void add8(forest *f, int32_t p, int16_t x, int16_t y, const int32_t *off8) {
  const int32_t *par = f->parent;
  unsigned in = (unsigned)(par[p + off8[0]] >= 0) | (unsigned)(par[p + off8[1]] >= 0) << 1 |
                (unsigned)(par[p + off8[2]] >= 0) << 2 | (unsigned)(par[p + off8[3]] >= 0) << 3 |
                (unsigned)(par[p + off8[4]] >= 0) << 4 | (unsigned)(par[p + off8[5]] >= 0) << 5 |
                (unsigned)(par[p + off8[6]] >= 0) << 6 | (unsigned)(par[p + off8[7]] >= 0) << 7;
  unsigned run_starts = in & ~((in << 1) | (in >> 7)) & 0xFFu; /* added, ring predecessor not */
  if (in == 0xFFu) run_starts = 1u;
  int32_t r = -1;
  while (run_starts) {
    int k = __builtin_ctz(run_starts);
    run_starts &= run_starts - 1;
    int32_t s = find(f->parent, p + off8[k]);
    if (r < 0) r = s;
    else if (s != r) r = link(f, r, s);
  }
  attach(f, p, x, y, r);
}

/* Adds p joined to its already added 4-neighbours (no two of them are 4-adjacent). */
static void add4(forest *f, int32_t p, int16_t x, int16_t y, const int32_t *off4) {
  int32_t r = -1;
  for (int k = 0; k < 4; k++) {
    int32_t nb = p + off4[k];
    if (f->parent[nb] < 0) continue;
    int32_t s = find(f->parent, nb);
    if (r < 0) r = s;
    else if (s != r) r = link(f, r, s);
  }
  attach(f, p, x, y, r);
}

/* wsolevaluation's calculate_multiple_iou for one pair, same float64 division as numpy. */
static double iou(int64_t ax0, int64_t ay0, int64_t ax1, int64_t ay1, const int64_t *g) {
  int64_t iw = (ax1 < g[2] ? ax1 : g[2]) - (ax0 > g[0] ? ax0 : g[0]) + 1;
  int64_t ih = (ay1 < g[3] ? ay1 : g[3]) - (ay0 > g[1] ? ay0 : g[1]) + 1;
  int64_t inter = (iw > 0 ? iw : 0) * (ih > 0 ? ih : 0);
  int64_t den = (ax1 - ax0 + 1) * (ay1 - ay0 + 1) + (g[2] - g[0] + 1) * (g[3] - g[1] + 1) - inter;
  return den <= 0 ? 0.0 : (double)inter / (double)den;
}

static double best_iou(int64_t x0, int64_t y0, int64_t x1, int64_t y1, const int64_t *gt,
                       int32_t num_gt) {
  double best = iou(x0, y0, x1, y1, gt);
  for (int32_t g = 1; g < num_gt; g++) {
    double s = iou(x0, y0, x1, y1, gt + 4 * g);
    if (s > best) best = s;
  }
  return best;
}

/* Best cached IoU over the listed roots; grow = 1 for outer borders (boundingRect's
   x + width, clipped as the reference), 2 for hole borders (one more pixel on each side). */
static double best_of_roots(forest *f, int grow, int32_t h, int32_t w, const int64_t *gt,
                            int32_t num_gt) {
  double best = -1.0;
  for (int32_t k = 0; k < f->num_roots; k++) {
    int32_t r = f->roots[k];
    if (f->dirty[r]) {
      int32_t x1 = f->x1[r] + grow < w - 1 ? f->x1[r] + grow : w - 1;
      int32_t y1 = f->y1[r] + grow < h - 1 ? f->y1[r] + grow : h - 1;
      f->score[r] = best_iou(f->x0[r] - grow + 1, f->y0[r] - grow + 1, x1, y1, gt, num_gt);
      f->dirty[r] = 0;
    }
    if (f->score[r] > best) best = f->score[r];
  }
  return best;
}

/* Indices (into the padded grid) of the image pixels grouped by val, val in 0..nv-1:
   order[start[k] .. start[k + 1]). */
static void bucket(const int16_t *val, const int32_t *pix, int32_t n, int32_t nv,
                   int32_t *start, int32_t *order) {
  for (int32_t k = 0; k <= nv; k++) start[k] = 0;
  for (int32_t i = 0; i < n; i++) start[val[pix[i]] + 1]++;
  for (int32_t k = 0; k < nv; k++) start[k + 1] += start[k];
  for (int32_t i = 0; i < n; i++) order[start[val[pix[i]]]++] = pix[i];
  for (int32_t k = nv; k > 0; k--) start[k] = start[k - 1];
  start[0] = 0;
}

int wsol_level_ious(const uint8_t *q, int32_t h, int32_t w, const int16_t *lut,
                    int32_t num_levels, const int64_t *gt, int32_t num_gt, double *multi,
                    double *largest, double *largest_first, int8_t *flags) {
  int32_t W = w + 2, np_ = (h + 2) * W, n = h * w, nv = num_levels + 1, status = -1;
  int32_t off8[8] = {-W - 1, -W, -W + 1, 1, W + 1, W, W - 1, -1}; /* around the ring */
  int32_t off4[4] = {-W, -1, 1, W};
  int16_t *v = malloc(sizeof(int16_t) * np_), *e = malloc(sizeof(int16_t) * np_);
  int16_t *xs = malloc(sizeof(int16_t) * np_), *ys = malloc(sizeof(int16_t) * np_);
  int32_t *pix = malloc(sizeof(int32_t) * n), *order = malloc(sizeof(int32_t) * n);
  int32_t *start = malloc(sizeof(int32_t) * (nv + 1)), *next = malloc(sizeof(int32_t) * np_);
  int32_t *head = malloc(sizeof(int32_t) * nv), *tail = malloc(sizeof(int32_t) * nv);
  int32_t num_win = (h - 1) * (w - 1) > 0 ? (h - 1) * (w - 1) : 0;
  int16_t *wval = malloc(sizeof(int16_t) * (2 * num_win + 1));
  int32_t *wpix = malloc(sizeof(int32_t) * (2 * num_win + 1));
  int32_t *wsorted = malloc(sizeof(int32_t) * (2 * num_win + 1));
  int32_t *wstart = malloc(sizeof(int32_t) * (nv + 1));
  int32_t *wcount = malloc(sizeof(int32_t) * (nv + 1));
  forest f = {0}, b = {0}, t = {0};
  if (!v || !e || !xs || !ys || !pix || !order || !start || !next || !head || !tail || !wval ||
      !wpix || !wsorted || !wstart || !wcount)
    goto done;
  for (int32_t p = 0; p < np_; p++) v[p] = e[p] = -1; /* padding */
  for (int32_t y = 0, i = 0; y < h; y++) {
    for (int32_t x = 0; x < w; x++, i++) {
      int32_t p = (y + 1) * W + x + 1;
      pix[i] = p;
      v[p] = lut[q[i]];
      xs[p] = (int16_t)x;
      ys[p] = (int16_t)y;
    }
  }
  for (int32_t i = 0; i < num_levels; i++) {
    multi[i] = -1.0;
    flags[i] = 0;
  }

  /* e, by a flood from the border pixels in level order (bucket queue, each pixel once). */
  for (int32_t k = 0; k < nv; k++) head[k] = tail[k] = -1;
  for (int32_t i = 0; i < n; i++) {
    int32_t p = pix[i], y = ys[p], x = xs[p];
    if (y == 0 || x == 0 || y == h - 1 || x == w - 1) {
      e[p] = v[p];
      next[p] = -1;
      if (tail[v[p]] >= 0) next[tail[v[p]]] = p;
      else head[v[p]] = p;
      tail[v[p]] = p;
    }
  }
  int holes = 0;
  for (int32_t lv = 0; lv < nv; lv++) {
    for (int32_t p = head[lv]; p >= 0; p = next[p]) {
      for (int k = 0; k < 4; k++) {
        int32_t nb = p + off4[k];
        if (e[nb] >= 0 || v[nb] < 0) continue; /* done, or padding */
        int16_t val = v[nb] > lv ? v[nb] : (int16_t)lv;
        holes |= val != v[nb];
        e[nb] = val;
        next[nb] = -1;
        if (tail[val] >= 0) next[tail[val]] = nb;
        else head[val] = nb;
        tail[val] = nb;
      }
    }
  }

  if (holes) {
    if (forest_init(&f, np_, 0) || forest_init(&b, np_, 0)) goto done;
    bucket(v, pix, n, nv, start, order);
    /* Foreground components: level i holds v > i. */
    for (int32_t i = num_levels - 1; i >= 0; i--) {
      for (int32_t k = start[i + 1]; k < start[i + 2]; k++)
        add8(&f, order[k], xs[order[k]], ys[order[k]], off8);
      multi[i] = best_of_roots(&f, 1, h, w, gt, num_gt);
    }
    /* Holes: at level i, the 4-connected sets of {v <= i < e}. Only pixels with e > v are ever
       in one; a hole's pixels share their e (they join the outside together), so a set leaves
       the list once i reaches it, and no pixel added later touches it then (that pixel would
       be outside as well, e == v). */
    for (int32_t i = 0; i < num_levels; i++) {
      for (int32_t k = start[i]; k < start[i + 1]; k++) {
        int32_t p = order[k];
        if (e[p] > v[p]) add4(&b, p, xs[p], ys[p], off4);
      }
      for (int32_t k = 0; k < b.num_roots; k++) {
        if (e[b.roots[k]] <= i) unlist(&b, b.roots[k--]);
      }
      double s = best_of_roots(&b, 2, h, w, gt, num_gt);
      if (s > multi[i]) multi[i] = s;
    }
  }

  /* Filled components (e > i). Their contour area is F4 + F3 / 2 over 2x2 windows: a window
     whose two lowest e are e1 <= e2 adds 1 (in half units) at levels below e2 and 1 more
     below e1, to the component of its highest pixel. */
  if (forest_init(&t, np_, 1)) goto done;
  int32_t m = 0;
  for (int32_t y = 0; y + 1 < h; y++) {
    for (int32_t x = 0; x + 1 < w; x++) {
      int32_t p0 = (y + 1) * W + x + 1, p1 = p0 + 1, p2 = p0 + W, p3 = p2 + 1;
      int16_t a0 = e[p0], a1 = e[p1], a2 = e[p2], a3 = e[p3];
      int16_t lo01 = a0 < a1 ? a0 : a1, hi01 = a0 < a1 ? a1 : a0;
      int16_t lo23 = a2 < a3 ? a2 : a3, hi23 = a2 < a3 ? a3 : a2;
      int16_t e1 = lo01 < lo23 ? lo01 : lo23;
      int16_t mid_lo = lo01 < lo23 ? lo23 : lo01, mid_hi = hi01 < hi23 ? hi01 : hi23;
      int16_t e2 = mid_lo < mid_hi ? mid_lo : mid_hi;
      int32_t top = hi01 >= hi23 ? (a0 >= a1 ? p0 : p1) : (a2 >= a3 ? p2 : p3);
      if (e1 > 0) wval[m] = e1, wpix[m++] = top;
      if (e2 > 0) wval[m] = e2, wpix[m++] = top;
    }
  }
  /* Windows grouped by value (counting sort). */
  for (int32_t k = 0; k <= nv; k++) wcount[k] = 0;
  for (int32_t k = 0; k < m; k++) wcount[wval[k] + 1]++;
  for (int32_t k = 0; k < nv; k++) wcount[k + 1] += wcount[k];
  for (int32_t k = 0; k <= nv; k++) wstart[k] = wcount[k];
  for (int32_t k = 0; k < m; k++) wsorted[wcount[wval[k]]++] = wpix[k];
  bucket(e, pix, n, nv, start, order);
  for (int32_t i = num_levels - 1; i >= 0; i--) {
    for (int32_t k = start[i + 1]; k < start[i + 2]; k++)
      add8(&t, order[k], xs[order[k]], ys[order[k]], off8);
    for (int32_t k = wstart[i + 1]; k < wstart[i + 2]; k++)
      t.area[find(t.parent, wsorted[k])] += 1;
    if (t.num_roots == 0) {
      flags[i] |= 2;
      continue;
    }
    if (!holes) multi[i] = best_of_roots(&t, 1, h, w, gt, num_gt);
    /* Largest contour, first in OpenCV's list on ties (Python's max). Tied contours are outer
       borders of components not inside another one (a nested contour is smaller than the one
       around it, a hole's border ties only with its own outer border, listed before it), and
       OpenCV lists those in reverse order of discovery: the raster scan meets a component at
       its first pixel, and each new contour is inserted as its parent's first child. So the
       tied component whose first pixel comes last wins (checked against OpenCV's own order by
       tests/test_wsol_box.py on random maps with hundreds of ties). */
    int32_t best = t.roots[0], ties = 1;
    for (int32_t k = 1; k < t.num_roots; k++) {
      int32_t s = t.roots[k];
      if (t.area[s] > t.area[best]) {
        best = s;
        ties = 1;
      } else if (t.area[s] == t.area[best]) {
        ties++;
        if (t.first[s] > t.first[best]) best = s;
      }
    }
    if (ties > 1) flags[i] |= 1;
    int32_t x1 = t.x1[best] + 1 < w - 1 ? t.x1[best] + 1 : w - 1;
    int32_t y1 = t.y1[best] + 1 < h - 1 ? t.y1[best] + 1 : h - 1;
    largest[i] = best_iou(t.x0[best], t.y0[best], x1, y1, gt, num_gt);
    largest_first[i] = iou(t.x0[best], t.y0[best], x1, y1, gt);
  }
  status = 0;

done:
  forest_free(&f);
  forest_free(&b);
  forest_free(&t);
  free(v);
  free(e);
  free(xs);
  free(ys);
  free(pix);
  free(order);
  free(start);
  free(next);
  free(head);
  free(tail);
  free(wval);
  free(wpix);
  free(wsorted);
  free(wstart);
  free(wcount);
  return status;
}

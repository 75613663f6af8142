/* loop.c — the libuv side of tide's event loop (see loop.h). */
#include "loop.h"

#include <signal.h>

/* The virtual clock (tide.testing): while on, now() is `virtual_now` and
 * moves only when told to, and `wake` is never armed: timers fire when the
 * clock is advanced past them.  One clock per loop: it was one per process,
 * and a second Lua state that turned it on froze the first's clock, whose
 * sleeping tasks never woke (spec/review_r1_spec.lua). */
uint64_t tide__loop_now(const tide__loop *loop) {
  return loop->virtual_on ? loop->virtual_now : uv_hrtime();
}


static void on_wake(uv_timer_t *h) {
  tide__loop *loop = h->data;
  loop->armed = 0;
  loop->on_tick(loop);
}

static void on_idle(uv_idle_t *h) {
  tide__loop *loop = h->data;
  loop->on_tick(loop);
}

static void on_signal(uv_signal_t *h, int signum) {
  tide__loop *loop = h->data;
  if (loop->on_signal) loop->on_signal(loop, signum);
}

static void on_init_failed(uv_handle_t *h) {
  (void)h;
}

int tide__loop_init(tide__loop *loop, uv_loop_t *uv, tide__tick_cb on_tick,
                    tide__signal_cb on_sig, void *data) {
  int rc;
  *loop = (tide__loop){ .on_tick = on_tick, .on_signal = on_sig, .data = data };
  if (uv == NULL) {
    if ((rc = uv_loop_init(&loop->own)) != 0) return rc;
    uv = &loop->own;
    loop->owns_uv = 1;
  }
  loop->uv = uv;
  tide__timers_init(&loop->timers);
  /* The signal handles first: the first one on a loop makes its signal pipe,
   * and can fail (EMFILE); timers and idles cannot.  When the second fails
   * the first is closed again: on our own loop at once; on a host's loop at
   * its next turn, so the struct must then outlive this call (`leak`). */
  if ((rc = uv_signal_init(uv, &loop->sigint)) == 0 &&
      (rc = uv_signal_init(uv, &loop->sigterm)) != 0) {
    uv_close((uv_handle_t *)&loop->sigint, on_init_failed);
    if (loop->owns_uv) uv_run(uv, UV_RUN_NOWAIT); else loop->leak = 1;
  }
  if (rc != 0) {
    if (loop->owns_uv) uv_loop_close(uv);
    return rc;
  }
  uv_timer_init(uv, &loop->wake);
  uv_idle_init(uv, &loop->idle);
  loop->wake.data = loop->idle.data = loop;
  loop->sigint.data = loop->sigterm.data = loop;
  loop->open_handles = 4;
  return 0;
}

static void on_closed(uv_handle_t *h) {
  tide__loop *loop = h->data;
  if (--loop->open_handles == 0) {
    tide__timers_free(&loop->timers);
    if (loop->closed) loop->closed(loop);
  }
}

int tide__loop_close(tide__loop *loop, void (*done)(tide__loop *)) {
  int owns = loop->owns_uv;
  /* With an owned loop, `done` (which may free the struct and the uv loop
   * inside it) runs only after uv_loop_close, from here. */
  loop->closed = owns ? NULL : done;
  uv_loop_t *uv = loop->uv;
  tide__close((uv_handle_t *)&loop->wake, on_closed);       /* (closed by the host: kept, see loop.h) */
  tide__close((uv_handle_t *)&loop->idle, on_closed);
  tide__close((uv_handle_t *)&loop->sigint, on_closed);
  tide__close((uv_handle_t *)&loop->sigterm, on_closed);
  if (!owns) return 0;
  uv_run(uv, UV_RUN_DEFAULT);
  int rc = uv_loop_close(uv);
  if (done) done(loop);
  return rc;
}

/* Arms `wake` for the earliest deadline, or stops it when none is pending.
 * A deadline already due is left to the idle handle instead: libuv (1.44)
 * runs its timer phase until no timer is due, so a 0 ms timer re-armed from
 * its own tick (tasks looping on tide.sleep(0)) would keep it there and
 * sockets would never be polled; the idle phase ticks once per iteration,
 * with a poll for I/O between two ticks. */
static void rearm(tide__loop *loop) {
  uint64_t deadline;
  if (!tide__timers_next(&loop->timers, &deadline)) {
    if (loop->armed) uv_timer_stop(&loop->wake);
    loop->armed = 0;
    return;
  }
  if (loop->armed == deadline || loop->virtual_on) return;
  uint64_t now = tide__loop_now(loop);
  if (deadline <= now) {
    if (loop->armed) uv_timer_stop(&loop->wake);
    loop->armed = 0;
    tide__loop_kick(loop);
    return;
  }
  uint64_t ms = (deadline - now + 999999) / 1000000;
  uv_update_time(loop->uv);
  uv_timer_start(&loop->wake, on_wake, ms, 0);
  loop->armed = deadline;
}

void tide__loop_set_virtual(tide__loop *loop, int on) {
  if (on && !loop->virtual_on) loop->virtual_now = uv_hrtime();
  loop->virtual_on = on;
  if (loop->armed) { uv_timer_stop(&loop->wake); loop->armed = 0; }
  rearm(loop);                               /* off: pending timers run on the real clock again */
}

int tide__loop_is_virtual(const tide__loop *loop) { return loop->virtual_on; }

void tide__loop_set_now(tide__loop *loop, uint64_t now) {
  if (!loop->virtual_on || now < loop->virtual_now) return;   /* monotonic: never back */
  loop->virtual_now = now;
  tide__loop_kick(loop);
}

int64_t tide__loop_timer_start(tide__loop *loop, uint64_t deadline) {
  int64_t key = tide__timers_start(&loop->timers, deadline);
  if (key > 0 && (loop->armed == 0 || deadline < loop->armed)) rearm(loop);
  return key;
}

int tide__loop_timer_cancel(tide__loop *loop, int64_t key) {
  int rc = tide__timers_cancel(&loop->timers, key);
  if (tide__timers_count(&loop->timers) == 0) rearm(loop);
  return rc;
}

/* (uv_idle_start does not check for a closed handle: it would queue it.) */
void tide__loop_kick(tide__loop *loop) {
  uv_handle_t *h = (uv_handle_t *)&loop->idle;
  if (!uv_is_active(h) && !uv_is_closing(h)) uv_idle_start(&loop->idle, on_idle);
}

int tide__loop_lost(const tide__loop *loop) {
  return uv_is_closing((const uv_handle_t *)&loop->wake) || uv_is_closing((const uv_handle_t *)&loop->idle) ||
         uv_is_closing((const uv_handle_t *)&loop->sigint) || uv_is_closing((const uv_handle_t *)&loop->sigterm);
}

void tide__loop_after_tick(tide__loop *loop, int more) {
  if (more)
    tide__loop_kick(loop);
  else if (uv_is_active((uv_handle_t *)&loop->idle))
    uv_idle_stop(&loop->idle);
  rearm(loop);
}

int tide__loop_signals(tide__loop *loop, int on) {
  int rc = 0;
  if (tide__loop_lost(loop)) return on ? UV_EINVAL : 0;   /* (uv_signal_start asserts on a closed one) */
  if (!on) {
    uv_signal_stop(&loop->sigint);
    uv_signal_stop(&loop->sigterm);
    return 0;
  }
  if ((rc = uv_signal_start(&loop->sigint, on_signal, SIGINT)) != 0) return rc;
  if ((rc = uv_signal_start(&loop->sigterm, on_signal, SIGTERM)) != 0) return rc;
  uv_unref((uv_handle_t *)&loop->sigint);
  uv_unref((uv_handle_t *)&loop->sigterm);
  return 0;
}

int tide__loop_run(tide__loop *loop, uv_run_mode mode) {
  loop->running++;
  int rc = uv_run(loop->uv, mode);
  loop->running--;
  return rc;
}

int tide__loop_active(const tide__loop *loop) {
  return uv_is_active((const uv_handle_t *)&loop->wake) +
         uv_is_active((const uv_handle_t *)&loop->idle);
}

/* ===== SIGPIPE (see loop.h) ===== */

void tide__ignore_sigpipe(void) {
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL) {
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
  }
}

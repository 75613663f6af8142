/* watchdog.c — the stall watchdog: its thread, its libuv loop, and the SIGURG that wakes the loop thread's hook (see watchdog.h). */
#include "watchdog.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <uv.h>

#define NS_PER_MS 1000000ull
#define MAX_WATCHDOGS 16            /* Lua universes with a watchdog at once */

/* Fields are owned as marked: [L] the loop thread, [W] the watchdog thread,
 * [mu] either, holding mu, [A] either, atomically. */
struct tide__watchdog {
  _Atomic uint64_t since;           /* [A] when the call under way began (ns); 0: none */
  _Atomic uint64_t seq;             /* [A] calls begun                                 */
  _Atomic uint64_t poked;           /* [A] seq of the call the loop thread was poked for */
  _Atomic uint64_t reported;        /* [A] seq of the last stall reported              */
  int depth;                        /* [L] nesting of enter                            */
  int started, failed;              /* [L] the thread runs; it could not start         */
  int slot;                         /* [L] index in `entries`, or -1                   */
  pthread_t loop_thread;            /* [L] set before the thread starts                */
  uint64_t stall_ns, grace_ns;      /* [L] as configured (copied to the thread at apply) */
  uv_mutex_t mu;
  uv_cond_t cv;                     /* signals the loop thread that `watched` changed  */
  uint64_t cfg_stall, cfg_grace;    /* [mu]                                            */
  int want_signals, stop;           /* [mu]                                            */
  int watched;                      /* [mu] the thread's `watching`, as last applied   */
  char note[200];                   /* [mu] who held the loop, for the exit message    */
  uv_thread_t thread;
  uv_loop_t loop;                   /* [W] from the start of the thread                */
  uv_async_t async;
  uv_timer_t timer;
  uv_signal_t sigint, sigterm;
  uint64_t t_stall, t_grace;        /* [W] */
  int watching, signum;             /* [W] signals watched; the first one seen, or 0   */
  uint64_t signal_at;               /* [W] */
  tide__poke_cb on_poke;
  void *data;
};

/* ===== SIGURG: pokes reach the loop thread they are for */

/* A slot per watchdog that may poke.  The handler reads only these: it calls
 * on_poke for the slots of the thread it runs on, which cannot be freed
 * meanwhile (a watchdog is freed on its own loop thread). */
static struct entry {
  _Atomic int used;
  _Atomic int pending;
  pthread_t thread;
  tide__poke_cb on_poke;
  void *data;
} entries[MAX_WATCHDOGS];

static pthread_mutex_t table_mu = PTHREAD_MUTEX_INITIALIZER;
static struct sigaction previous;   /* SIGURG's handler before ours */
static int installed;

static void on_sigurg(int sig, siginfo_t *info, void *uc) {
  int saved = errno;
  pthread_t self = pthread_self();
  for (int i = 0; i < MAX_WATCHDOGS; i++) {
    struct entry *e = &entries[i];
    if (!atomic_load(&e->used) || !pthread_equal(e->thread, self)) continue;
    if (atomic_exchange(&e->pending, 0)) e->on_poke(e->data);
  }
  if (previous.sa_flags & SA_SIGINFO) {
    if (previous.sa_sigaction) previous.sa_sigaction(sig, info, uc);
  } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
    previous.sa_handler(sig);
  }
  errno = saved;
}

/* Takes a slot (installing the handler the first time); -1 when none is free. */
static int take_slot(tide__watchdog *w) {
  int slot = -1;
  pthread_mutex_lock(&table_mu);
  if (!installed) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigurg;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    installed = sigaction(SIGURG, &sa, &previous) == 0;
  }
  for (int i = 0; installed && i < MAX_WATCHDOGS && slot < 0; i++) {
    if (atomic_load(&entries[i].used)) continue;
    entries[i].thread = w->loop_thread;
    entries[i].on_poke = w->on_poke;
    entries[i].data = w->data;
    atomic_store(&entries[i].pending, 0);
    atomic_store(&entries[i].used, 1);
    slot = i;
  }
  pthread_mutex_unlock(&table_mu);
  return slot;
}

static void drop_slot(int slot) {
  if (slot < 0) return;
  pthread_mutex_lock(&table_mu);
  atomic_store(&entries[slot].used, 0);
  pthread_mutex_unlock(&table_mu);
}

/* ===== the watchdog thread */

/* Writes why, and ends the process with the signal's status.  The loop
 * thread is stuck: nothing on it can run, so nothing is cleaned up. */
static void die(tide__watchdog *w, uint64_t now, uint64_t since) {
  char msg[512], note[sizeof w->note];
  uv_mutex_lock(&w->mu);
  memcpy(note, w->note, sizeof note);
  uv_mutex_unlock(&w->mu);
  int n = snprintf(msg, sizeof msg,
                   "tide: %s %.1f s ago, and the loop is still blocked (one call into Lua has run "
                   "%.1f s%s%s): exiting with status %d\n",
                   w->signum == SIGINT ? "SIGINT" : "SIGTERM",
                   (double)(now - w->signal_at) / 1e9, (double)(now - since) / 1e9,
                   note[0] ? "; " : "", note, 128 + w->signum);
  if (n > 0) {
    ssize_t rc = write(2, msg, (size_t)n < sizeof msg ? (size_t)n : sizeof msg - 1);
    (void)rc;
  }
  _exit(128 + w->signum);
}

/* Looks at the call under way: pokes the loop thread once per stall, and
 * ends the process when a signal's grace period is over and it is blocked. */
static void check(tide__watchdog *w, uint64_t now) {
  uint64_t seq = atomic_load(&w->seq);
  uint64_t since = atomic_load(&w->since);
  if (since == 0 || w->t_stall == 0 || atomic_load(&w->seq) != seq) return;
  if (now < since || now - since < w->t_stall) return;
  if (atomic_load(&w->poked) != seq && w->slot >= 0) {
    atomic_store(&w->poked, seq);
    atomic_store(&entries[w->slot].pending, 1);
    pthread_kill(w->loop_thread, SIGURG);
  }
  if (w->signum && now >= w->signal_at + w->t_grace) die(w, now, since);
}

static void on_timer(uv_timer_t *h) {
  check(h->data, uv_hrtime());
}

static void on_signal(uv_signal_t *h, int signum) {
  tide__watchdog *w = h->data;
  uint64_t now = uv_hrtime();
  if (w->signum == 0) {
    w->signum = signum;
    w->signal_at = now;
    return;
  }
  uint64_t since = atomic_load(&w->since);            /* a second signal: blocked now? */
  if (since != 0 && w->t_stall != 0 && now - since >= w->t_stall) die(w, now, since);
}

static void close_all(tide__watchdog *w) {
  uv_close((uv_handle_t *)&w->async, NULL);
  uv_close((uv_handle_t *)&w->timer, NULL);
  uv_close((uv_handle_t *)&w->sigint, NULL);
  uv_close((uv_handle_t *)&w->sigterm, NULL);
}

/* Takes the configuration the loop thread left under mu. */
static void apply(tide__watchdog *w) {
  uv_mutex_lock(&w->mu);
  int stop = w->stop, want = w->want_signals;
  w->t_stall = w->cfg_stall;
  w->t_grace = w->cfg_grace;
  uv_mutex_unlock(&w->mu);
  if (stop) { close_all(w); return; }
  if (w->t_stall) {
    uint64_t period = w->t_stall / 5 / NS_PER_MS;
    period = period < 10 ? 10 : period > 200 ? 200 : period;
    uv_timer_start(&w->timer, on_timer, period, period);
  } else {
    uv_timer_stop(&w->timer);
  }
  if (want && !w->watching) {
    w->watching = uv_signal_start(&w->sigint, on_signal, SIGINT) == 0 &&
                  uv_signal_start(&w->sigterm, on_signal, SIGTERM) == 0;
  } else if (!want && w->watching) {
    uv_signal_stop(&w->sigint);
    uv_signal_stop(&w->sigterm);
    w->watching = 0;
  }
  if (!want) w->signum = 0;
  uv_mutex_lock(&w->mu);
  w->watched = w->watching;
  uv_cond_signal(&w->cv);
  uv_mutex_unlock(&w->mu);
}

static void on_async(uv_async_t *h) {
  apply(h->data);
}

static void watchdog_main(void *arg) {
  tide__watchdog *w = arg;
  apply(w);
  uv_run(&w->loop, UV_RUN_DEFAULT);
}

/* Creates the loop and its handles, then the thread.  0, or -1 (nothing left open). */
static int start(tide__watchdog *w) {
  w->loop_thread = pthread_self();
  if (uv_loop_init(&w->loop) != 0) return -1;
  int rc = uv_async_init(&w->loop, &w->async, on_async);
  if (rc == 0) {
    uv_timer_init(&w->loop, &w->timer);
    uv_signal_init(&w->loop, &w->sigint);
    rc = uv_signal_init(&w->loop, &w->sigterm);     /* cannot fail on Unix, checked anyway */
    w->async.data = w->timer.data = w->sigint.data = w->sigterm.data = w;
    w->slot = take_slot(w);
    if (rc == 0) rc = uv_thread_create(&w->thread, watchdog_main, w);
    if (rc == 0) return 0;
    drop_slot(w->slot);
    w->slot = -1;
    close_all(w);
    uv_run(&w->loop, UV_RUN_DEFAULT);              /* the close callbacks */
  }
  uv_loop_close(&w->loop);
  return -1;
}

/* ===== the loop thread's side */

tide__watchdog *tide__watchdog_new(tide__poke_cb on_poke, void *data) {
  tide__watchdog *w = calloc(1, sizeof *w);
  if (w == NULL) return NULL;
  if (uv_mutex_init(&w->mu) != 0) { free(w); return NULL; }
  if (uv_cond_init(&w->cv) != 0) { uv_mutex_destroy(&w->mu); free(w); return NULL; }
  w->on_poke = on_poke;
  w->data = data;
  w->slot = -1;
  w->stall_ns = w->cfg_stall = 1000 * NS_PER_MS;
  w->grace_ns = w->cfg_grace = 5000 * NS_PER_MS;
  return w;
}

static void tell(tide__watchdog *w) {
  if (w->started) uv_async_send(&w->async);
}

void tide__watchdog_free(tide__watchdog *w) {
  if (w == NULL) return;
  if (w->started) {
    drop_slot(w->slot);
    uv_mutex_lock(&w->mu);
    w->stop = 1;
    uv_mutex_unlock(&w->mu);
    uv_async_send(&w->async);
    uv_thread_join(&w->thread);
    uv_loop_close(&w->loop);
  }
  uv_cond_destroy(&w->cv);
  uv_mutex_destroy(&w->mu);
  free(w);
}

void tide__watchdog_enter(tide__watchdog *w) {
  if (w == NULL || w->depth++ > 0) return;
  if (!w->started && !w->failed && w->stall_ns) {
    if (start(w) == 0) w->started = 1; else w->failed = 1;
  }
  atomic_fetch_add(&w->seq, 1);
  atomic_store(&w->since, uv_hrtime());
}

uint64_t tide__watchdog_leave(tide__watchdog *w) {
  if (w == NULL || --w->depth > 0) return 0;
  uint64_t seq = atomic_load(&w->seq);
  uint64_t since = atomic_exchange(&w->since, 0);
  if (atomic_load(&w->poked) != seq || atomic_load(&w->reported) == seq) return 0;
  atomic_store(&w->reported, seq);
  uint64_t ms = (uv_hrtime() - since) / NS_PER_MS;
  return ms ? ms : 1;
}

int tide__watchdog_in_call(const tide__watchdog *w) {
  return w != NULL && w->depth > 0;
}

uint64_t tide__watchdog_claim(tide__watchdog *w) {
  uint64_t seq = atomic_load(&w->seq), since = atomic_load(&w->since), now = uv_hrtime();
  if (since == 0 || atomic_load(&w->poked) != seq || atomic_load(&w->reported) == seq) return 0;
  if (now < since || now - since < w->stall_ns) return 0;
  atomic_store(&w->reported, seq);
  uint64_t ms = (now - since) / NS_PER_MS;
  return ms ? ms : 1;
}

/* ms as ns, at most MAX_MS (a larger double cast to uint64_t is undefined:
 * a grace of 1e300 ms came out as 0, and a blocked loop ended at once). */
#define MAX_MS 1e12

static uint64_t ms_to_ns(double ms) {
  return (uint64_t)((ms < MAX_MS ? ms : MAX_MS) * (double)NS_PER_MS);
}

void tide__watchdog_configure(tide__watchdog *w, double stall_ms, double grace_ms) {
  if (stall_ms >= 0) w->stall_ns = ms_to_ns(stall_ms);
  if (grace_ms >= 0) w->grace_ns = ms_to_ns(grace_ms);
  uv_mutex_lock(&w->mu);
  w->cfg_stall = w->stall_ns;
  w->cfg_grace = w->grace_ns;
  uv_mutex_unlock(&w->mu);
  tell(w);
}

/* Turning signals off waits until the watchdog's handles are stopped: a
 * signal that comes later must find libuv's handler gone (or the loop's). */
void tide__watchdog_signals(tide__watchdog *w, int on) {
  uv_mutex_lock(&w->mu);
  w->want_signals = on;
  uv_mutex_unlock(&w->mu);
  tell(w);
  if (on || !w->started) return;
  uv_mutex_lock(&w->mu);
  while (w->watched) uv_cond_wait(&w->cv, &w->mu);
  uv_mutex_unlock(&w->mu);
}

void tide__watchdog_note(tide__watchdog *w, const char *text) {
  uv_mutex_lock(&w->mu);
  snprintf(w->note, sizeof w->note, "%s", text ? text : "");
  uv_mutex_unlock(&w->mu);
}

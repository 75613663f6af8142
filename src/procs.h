/* procs.h — child processes that run jobs, each in a fresh LuaJIT state of its own.
 *
 * No Lua here.  A tide__proc is one child: an executable started with
 * uv_spawn in a session (and process group) of its own, with two pipes:
 *   fd 2  its stderr, read by the parent: forwarded to the parent's stderr,
 *         and its last TIDE_PROC_TAIL bytes kept for the report of a death;
 *   fd 3  a socketpair carrying frames both ways (below).
 * The child's side of it all is tide__proc_child_main (proc_child.c): it
 * runs each job with the thread pool's worker (worker.h), so a process runs
 * exactly what a thread would, with the same codec for what crosses.
 *
 * Frames: u32 length of what follows (little-endian), u8 type, payload.
 * Strings are u32 length + bytes; length 0xffffffff stands for NULL.
 *   parent -> child  'C' config: u32 index, u32 parent pid, u64 memory limit,
 *                        str path, str cpath, str init   (first frame, once)
 *                    'J' job: u64 id, u8 fn_is_name, str fn, str args
 *   child -> parent  'R' ready: str init error (NULL: none)
 *                    'D' done: u64 id, u8 ok, str result, str trace
 * A child runs one job at a time; the parent sends the next job only after
 * the `done` of the last one.  A stop request is SIGUSR1 sent with
 * sigqueue, its value the job's id: the child's stop hook raises
 * "cancelled" in that job if it still runs it, at its next check (never
 * inside JIT-compiled code or a blocking C call: then only SIGKILL helps).
 *
 * Lifetime: tide__proc_spawn makes the struct; events come through one
 * callback; after the `exit` event (the child died, for whatever reason,
 * and was reaped, by libuv or by anyone) or tide__proc_close, the struct closes its
 * handles and frees itself: the caller must forget it then.  A child never
 * outlives its parent: it holds PR_SET_PDEATHSIG, watches fd 3 for the
 * parent's end closing, and is killed (with its process group) and reaped
 * by tide__proc_close.
 *
 * Only call these from the loop thread.
 */
#ifndef TIDE_PROCS_H
#define TIDE_PROCS_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#define TIDE_PROC_TAIL      2048               /* bytes of stderr kept per child */
#define TIDE_PROC_CHILD_ARG "--tide-process-child"   /* argv[1] of a child run by the tide binary */

typedef struct tide__proc tide__proc;

typedef enum { TIDE_PROC_READY = 1, TIDE_PROC_DONE, TIDE_PROC_EXIT } tide__proc_event_kind;

typedef struct tide__proc_event {
  tide__proc_event_kind kind;
  /* READY */
  const char *init_error;            /* NULL when init went well            */
  size_t init_error_len;
  /* DONE */
  uint64_t id;
  int ok;
  const char *result, *trace;        /* trace may be NULL                   */
  size_t result_len, trace_len;
  /* EXIT */
  int64_t exit_status;
  int term_signal;                   /* 0 when it exited by itself          */
  int status_known;                  /* 0: another waitpid took the status  */
  const char *tail;                  /* the end of its stderr               */
  size_t tail_len;
} tide__proc_event;

/* Called for each event, on the loop thread.  After an EXIT event the
 * struct is gone: p may only be compared, not used. */
typedef void (*tide__proc_cb)(tide__proc *p, const tide__proc_event *ev, void *data);

typedef struct tide__proc_config {
  const char *file;                  /* executable: a path, or a name looked up in PATH */
  char **args;                       /* argv, NULL-terminated, args[0] included        */
  int index;                         /* 1-based, shown by the child's tide.log          */
  const char *path, *cpath, *init;   /* for the child's state; init may be NULL         */
  size_t memory_limit;               /* bytes; 0: no limit                              */
} tide__proc_config;

/* Starts a child; *out is set on success.  0, or a UV_E* code with a
 * message in err.  The child's handles start referenced (starting up is
 * work the loop waits for); tide__proc_ref changes that. */
int tide__proc_spawn(uv_loop_t *loop, const tide__proc_config *cfg, tide__proc_cb cb,
                     void *data, tide__proc **out, char *err, size_t errlen);

/* Sends a job.  0, or a UV_E* code (out of memory, the child is gone). */
int tide__proc_submit(tide__proc *p, uint64_t id, const char *fn, size_t fn_len, int fn_is_name,
                      const char *args, size_t args_len);

/* Asks the child to stop job `id` (SIGUSR1 with the id).  0 or -errno. */
int tide__proc_stop(tide__proc *p, uint64_t id);

/* SIGKILLs the child's process group; the EXIT event follows.  0 or -errno. */
int tide__proc_kill(tide__proc *p);

/* Whether the child keeps the loop alive (it does while it has work). */
void tide__proc_ref(tide__proc *p, int on);

int tide__proc_pid(const tide__proc *p);

/* Kills the child's process group, reaps the child and closes the handles;
 * no event comes any more.  The struct frees itself once they are closed. */
void tide__proc_close(tide__proc *p);

/* ===== reading a child's frames (proc_frame.c: no libuv, fuzzed) */

#define TIDE_PROC_FRAME_MAX 0xfffffff0u    /* the largest length a frame may give */

/* Whether buf (len bytes) starts with a whole frame: 1, its size (length
 * field included) in *size; 0 when more bytes are needed; -1 when its
 * length makes no sense, or its type (judged as soon as it arrived) is
 * none a child sends, or its length is too short for that type. */
int tide__proc_frame_size(const char *buf, size_t len, size_t *size);

/* Decodes frame f (len bytes after the length: type, payload) into *ev,
 * whose strings then point into f (init_error is not NUL-terminated);
 * `ready`: whether the child said it was ready before.  0, or -1 when the
 * frame breaks the protocol (a second ready, a done before the ready, an
 * unknown type, a field cut short or bytes after the last). */
int tide__proc_decode(const char *f, size_t len, int ready, tide__proc_event *ev);

/* The length field of a child's 'D' frame for a result and a trace of these
 * lengths (trace_len SIZE_MAX: no trace), or 0 when that frame would be
 * longer than a frame may be: the child then sends an error in its place. */
size_t tide__proc_done_length(size_t result_len, size_t trace_len);

/* Set (to 1) by the tide binary's main(): a child is then the binary itself,
 * run with TIDE_PROC_CHILD_ARG; else a luajit that loads tide.so. */
extern int tide__proc_in_host;

/* The child's side: reads frames on fd 3 and runs the jobs until the parent
 * goes away; returns the process's exit status.  (proc_child.c) */
int tide__proc_child_main(void);

#endif

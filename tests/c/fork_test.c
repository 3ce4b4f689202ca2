/*
 * fork() after using the library (SPEC §2b), as Python multiprocessing and data-loader workers do:
 * a child can create heads and use them, and so can the parent afterwards.
 *
 *   fork_test SCRATCH_DIR
 *
 * Compiled and run by tests/all/fork.rs (C11, -Wall -Wextra -Werror, -pthread). Scenarios:
 *  1. idle fork: the parent has used the library (its worker threads exist); the child creates a
 *     head and runs every call that works in parallel, and uses the parent's idle head, a copy;
 *  2. busy fork: another thread is inside a step on a head when the process forks; in the child that
 *     head answers with an error (its lock's holder does not exist there) instead of waiting forever,
 *     and new heads work;
 *  3. no threads: a child that may not start threads (RLIMIT_NPROC for an unprivileged user) gets
 *     PFC_ERR_OUT_OF_MEMORY from pfc_create, and a working head once the limit is lifted.
 * Every child runs under alarm(): a hang kills it with SIGALRM, which the parent reports.
 * Prints "fork: N checks passed" and exits 0 on success.
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "partialfc.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define D 32
#define ROWS 24
#define CHILD_SECONDS 120

static unsigned checks = 0;

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}
static const char *scratch;

static const char *last_error(void) {
    static char buf[1024];
    pfc_last_error(buf, sizeof buf);
    return buf;
}

#define FAIL(...)                                                  \
    do {                                                           \
        fprintf(stderr, "fork (pid %d): FAILED at line %d: ", (int)getpid(), __LINE__); \
        fprintf(stderr, __VA_ARGS__);                              \
        fprintf(stderr, "\n");                                     \
        exit(1);                                                   \
    } while (0)

#define EXPECT_STATUS(call, want)                                                                \
    do {                                                                                         \
        pfc_status got_ = (call);                                                                \
        if (got_ != (want)) FAIL("%s returned %d, expected %d: %s", #call, (int)got_, (int)(want), last_error()); \
        checks++;                                                                                \
    } while (0)
#define EXPECT_OK(call) EXPECT_STATUS(call, PFC_OK)

static pfc_head *create(uint64_t classes, uint32_t shards, float sample_rate) {
    pfc_config cfg;
    pfc_config_init(&cfg);
    cfg.num_classes = classes;
    cfg.embedding_dim = D;
    cfg.local_shards = shards;
    cfg.sample_rate = sample_rate;
    cfg.seed = 3;
    pfc_head *h = NULL;
    EXPECT_OK(pfc_create(&cfg, &h));
    return h;
}

static float emb[ROWS * D], grad[ROWS * D];
static int64_t labels[ROWS];

static void make_batch(uint64_t classes) {
    for (int i = 0; i < ROWS * D; i++) emb[i] = sinf(0.37f * (float)i + 1.0f);
    for (int i = 0; i < ROWS; i++) labels[i] = (int64_t)((uint64_t)(i * 7919) % classes);
}

/* One batch per shard over the same global batch: ROWS split in `shards` parts. */
static pfc_status step(pfc_head *h, uint32_t shards, int train, pfc_step_stats *stats) {
    pfc_batch b[4];
    uint64_t at = 0;
    for (uint32_t s = 0; s < shards; s++) {
        uint64_t rows = ROWS / shards + (s < ROWS % shards);
        memset(&b[s], 0, sizeof b[s]);
        b[s].embeddings = emb + at * D;
        b[s].labels = labels + at;
        b[s].grad_embeddings = grad + at * D;
        b[s].batch_size = rows;
        b[s].dtype = PFC_DTYPE_F32;
        b[s].memory = PFC_MEMORY_HOST;
        at += rows;
    }
    return train ? pfc_train_step(h, b, shards, stats) : pfc_evaluate(h, b, shards, stats);
}

/* Every call that runs on the worker pool, each expected to succeed with finite results. */
static void use_head(pfc_head *h, uint64_t classes, uint32_t shards, const char *tag) {
    pfc_step_stats st;
    for (int i = 0; i < 3; i++) {
        EXPECT_OK(step(h, shards, 1, &st));
        if (!isfinite(st.loss)) FAIL("%s: step loss %f", tag, st.loss);
    }
    EXPECT_OK(step(h, shards, 0, &st));
    if (!isfinite(st.loss)) FAIL("%s: evaluation loss %f", tag, st.loss);
    int64_t ids[4 * 5];
    float scores[4 * 5];
    EXPECT_OK(pfc_search(h, emb, 4, 5, ids, scores));
    for (int i = 0; i < 20; i++) {
        if (ids[i] < 0 || (uint64_t)ids[i] >= classes || !isfinite(scores[i])) FAIL("%s: search hit %d", tag, i);
    }
    char dir[512], file[600];
    snprintf(dir, sizeof dir, "%s/%s-%d", scratch, tag, (int)getpid());
    EXPECT_OK(pfc_save_checkpoint(h, dir));
    EXPECT_OK(pfc_load_checkpoint(h, dir));
    snprintf(file, sizeof file, "%s.npy", dir);
    EXPECT_OK(pfc_export_centers(h, file, PFC_FORMAT_NPY, PFC_DTYPE_F32, 1));
}

/* Waits for child `pid`; returns its exit code, failing on a signal (SIGALRM: it hung). */
static int wait_child(pid_t pid, const char *what) {
    int status = 0;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) FAIL("waitpid: %s", strerror(errno));
    }
    if (WIFSIGNALED(status)) {
        FAIL("%s: the child was killed by signal %d%s", what, WTERMSIG(status),
             WTERMSIG(status) == SIGALRM ? " (it hung: alarm after " "120" " s)" : "");
    }
    checks++;
    return WEXITSTATUS(status);
}

/* ---- 1. idle fork ---------------------------------------------------------------------------- */

static void idle_fork(pfc_head *parent_head) {
    pid_t pid = fork();
    if (pid < 0) FAIL("fork: %s", strerror(errno));
    if (pid == 0) {
        alarm(CHILD_SECONDS);
        pfc_head *mine = create(3000, 2, 0.5f);
        use_head(mine, 3000, 2, "idle-child-new");
        pfc_destroy(mine);
        use_head(parent_head, 3000, 3, "idle-child-inherited");
        _exit(0);
    }
    if (wait_child(pid, "idle fork") != 0) FAIL("idle fork: the child failed (see above)");
}

/* ---- 2. busy fork ---------------------------------------------------------------------------- */

#define BUSY_CLASSES 400000
static pfc_head *busy_head;
static volatile int stop_stepping = 0;
static volatile int steps_done = 0;

static void *keep_stepping(void *arg) {
    (void)arg;
    while (!stop_stepping) {
        pfc_step_stats st;
        if (step(busy_head, 1, 1, &st) != PFC_OK) {
            fprintf(stderr, "fork: stepping thread: %s\n", last_error());
            exit(1);
        }
        steps_done++;
    }
    return NULL;
}

/* The child's exit codes. */
enum { BUSY_SEEN = 0, BUSY_MISSED = 3 };

static int busy_fork_once(void) {
    pid_t pid = fork();
    if (pid < 0) FAIL("fork: %s", strerror(errno));
    if (pid == 0) {
        alarm(CHILD_SECONDS);
        pfc_step_stats st;
        pfc_status s = step(busy_head, 1, 1, &st);
        int seen = s != PFC_OK;
        if (seen && (s != PFC_ERR_INVALID_ARGUMENT || strstr(last_error(), "forked") == NULL)) {
            FAIL("a head busy at the fork gave status %d: %s", (int)s, last_error());
        }
        if (seen) {
            /* Every call refuses it the same way; destroying it is safe. */
            uint64_t first, count;
            EXPECT_STATUS(pfc_local_classes(busy_head, &first, &count), PFC_ERR_INVALID_ARGUMENT);
            EXPECT_STATUS(pfc_set_learning_rate(busy_head, 0.1f), PFC_ERR_INVALID_ARGUMENT);
        }
        pfc_destroy(busy_head);
        pfc_head *mine = create(3000, 2, 0.5f);
        use_head(mine, 3000, 2, "busy-child-new");
        pfc_destroy(mine);
        _exit(seen ? BUSY_SEEN : BUSY_MISSED);
    }
    return wait_child(pid, "busy fork");
}

static void busy_fork(void) {
    busy_head = create(BUSY_CLASSES, 1, 1.0f);
    pthread_t t;
    if (pthread_create(&t, NULL, keep_stepping, NULL) != 0) FAIL("pthread_create");
    while (steps_done < 1) sleep_ms(1);
    /* The thread is inside a step nearly all the time (steps follow each other back to back). */
    int tries = 0, code = BUSY_MISSED;
    while (code == BUSY_MISSED && tries++ < 10) {
        sleep_ms(20);
        code = busy_fork_once();
    }
    if (code != BUSY_SEEN) FAIL("busy fork: %s", code == BUSY_MISSED ? "never forked during a step" : "the child failed (see above)");
    stop_stepping = 1;
    pthread_join(t, NULL);
    /* The parent's head is untouched by what the child did. */
    pfc_step_stats st;
    EXPECT_OK(step(busy_head, 1, 1, &st));
    pfc_destroy(busy_head);
}

/* ---- 3. no threads --------------------------------------------------------------------------- */

static void no_threads(void) {
    pid_t pid = fork();
    if (pid < 0) FAIL("fork: %s", strerror(errno));
    if (pid == 0) {
        alarm(CHILD_SECONDS);
        /* RLIMIT_NPROC binds unprivileged users only: root first becomes nobody. */
        if (getuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) FAIL("cannot drop root to nobody: %s", strerror(errno));
        struct rlimit lim;
        if (getrlimit(RLIMIT_NPROC, &lim) != 0) FAIL("getrlimit");
        rlim_t hard = lim.rlim_max;
        lim.rlim_cur = 1; /* this process alone: no thread can start */
        if (setrlimit(RLIMIT_NPROC, &lim) != 0) FAIL("setrlimit: %s", strerror(errno));
        pfc_config cfg;
        pfc_config_init(&cfg);
        cfg.num_classes = 3000;
        cfg.embedding_dim = D;
        pfc_head *h = (pfc_head *)&cfg;
        EXPECT_STATUS(pfc_create(&cfg, &h), PFC_ERR_OUT_OF_MEMORY);
        if (h != (pfc_head *)&cfg) FAIL("a failed pfc_create wrote *out");
        if (strstr(last_error(), "worker threads") == NULL) FAIL("message: %s", last_error());
        /* The failure is not remembered: with threads allowed again, heads work. */
        lim.rlim_cur = hard;
        if (setrlimit(RLIMIT_NPROC, &lim) != 0) FAIL("setrlimit: %s", strerror(errno));
        EXPECT_OK(pfc_create(&cfg, &h));
        pfc_step_stats st;
        EXPECT_OK(step(h, 1, 1, &st));
        pfc_destroy(h);
        _exit(0);
    }
    if (wait_child(pid, "no threads") != 0) FAIL("no threads: the child failed (see above)");
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: fork_test SCRATCH_DIR\n");
        return 2;
    }
    scratch = argv[1];
    alarm(6 * CHILD_SECONDS);
    make_batch(3000);
    pfc_head *h = create(3000, 3, 0.5f);
    use_head(h, 3000, 3, "parent-before");
    idle_fork(h);
    use_head(h, 3000, 3, "parent-after-idle");
    busy_fork();
    no_threads();
    use_head(h, 3000, 3, "parent-after-all");
    pfc_destroy(h);
    printf("fork: %u checks passed\n", checks);
    return 0;
}

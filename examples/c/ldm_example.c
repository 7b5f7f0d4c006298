/*
 * A tiny C program embedding ldm-wgpu through include/ldm.h: generate an image, cancel a
 * generation from a second thread, run two models on one engine side by side, and show the
 * error path. examples/c/build.sh builds and runs it (CI does, on the CPU Vulkan driver).
 *
 *   ldm_example MODEL_DIR OUT.png
 *   ldm_example --version
 *
 * writes OUT.png for "a blue circle on a yellow background", seed 42, 10 steps, which is the
 * same file `ldm generate -m MODEL_DIR -p "..." --seed 42 -s 10 -o OUT.png` writes.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ldm.h"

#define CHECK(call)                                                                   \
    do {                                                                              \
        ldm_status s_ = (call);                                                       \
        if (s_ != LDM_OK) {                                                           \
            fprintf(stderr, "%s:%d: %s -> %d\n%s\n", __FILE__, __LINE__, #call, s_, \
                    ldm_last_error());                                                \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

/* Progress of one job, shared between its callback (on the job's thread) and the main thread. */
typedef struct {
    atomic_uint step;
} progress_state;

static int32_t on_progress(const ldm_progress *p, void *user_data) {
    progress_state *state = user_data;
    atomic_store(&state->step, p->step);
    return 1; /* go on */
}

typedef struct {
    ldm_job *job;
    progress_state *state;
} canceller_args;

/* The "Cancel" button: another thread, waiting for the second step, then ldm_cancel. */
static void *canceller(void *arg) {
    canceller_args *a = arg;
    while (atomic_load(&a->state->step) < 2) {
        sched_yield();
    }
    CHECK(ldm_cancel(a->job));
    return NULL;
}

static ldm_request blue_circle(void) {
    ldm_request req;
    CHECK(ldm_request_default(&req));
    req.prompt = "a blue circle on a yellow background";
    req.seed = 42;
    req.steps = 10;
    return req;
}

static size_t image_bytes(const ldm_image *img) { return (size_t)img->width * img->height * 3; }

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--version") == 0) {
        printf("libldm %s (ABI %u)\n", ldm_version(), ldm_abi_version());
        return ldm_abi_version() == LDM_ABI_VERSION ? 0 : 1;
    }
    if (argc != 3) {
        fprintf(stderr, "usage: %s MODEL_DIR OUT.png\n", argv[0]);
        return 2;
    }
    const char *model_dir = argv[1], *out_png = argv[2];
    if (ldm_abi_version() != LDM_ABI_VERSION) {
        fprintf(stderr, "libldm has ABI %u, this program was built for %u\n", ldm_abi_version(),
                LDM_ABI_VERSION);
        return 1;
    }
    printf("libldm %s (ABI %u)\n", ldm_version(), ldm_abi_version());

    /* One engine (the LDM_* variables honoured, as the CLI does). */
    ldm_engine_options eo;
    CHECK(ldm_engine_options_default(&eo));
    eo.use_env = 1;
    ldm_engine *engine = NULL;
    CHECK(ldm_engine_new(&eo, &engine));
    const char *adapter = NULL;
    CHECK(ldm_engine_adapter(engine, &adapter));
    printf("adapter: %s\n", adapter);

    /* 1. Generate, and write the PNG with its parameters text. */
    ldm_model *model = NULL;
    CHECK(ldm_model_load(engine, model_dir, NULL, &model));
    ldm_request req = blue_circle();
    ldm_result *result = NULL;
    CHECK(ldm_generate(model, &req, &result));
    ldm_image first;
    CHECK(ldm_result_image(result, 0, &first));
    const char *parameters = NULL;
    CHECK(ldm_result_info(result, 0, NULL, &parameters));
    CHECK(ldm_result_save_png(result, 0, out_png));
    printf("generate: %ux%u -> %s\n  parameters: %s\n", first.width, first.height, out_png,
           parameters);

    /* 2. Cancel from a second thread, during the denoising. */
    progress_state state = {0};
    ldm_request slow = blue_circle();
    slow.steps = 50;
    slow.progress = on_progress;
    slow.user_data = &state;
    ldm_job *job = NULL;
    CHECK(ldm_generate_async(model, &slow, &job));
    canceller_args args = {job, &state};
    pthread_t thread;
    pthread_create(&thread, NULL, canceller, &args);
    ldm_result *none = NULL;
    ldm_status s = ldm_job_wait(job, &none);
    pthread_join(thread, NULL);
    unsigned stopped_at = atomic_load(&state.step);
    if (s != LDM_ERR_CANCELLED || none != NULL || stopped_at > 3) {
        fprintf(stderr, "cancel: status %d after step %u (expected LDM_ERR_CANCELLED by 3)\n", s,
                stopped_at);
        return 1;
    }
    printf("cancel: stopped after step %u of 50 (%s)\n", stopped_at, ldm_last_error());
    CHECK(ldm_job_free(job));

    /* 3. Two models on one engine, generating at the same time. */
    ldm_model *second = NULL;
    CHECK(ldm_model_load(engine, model_dir, NULL, &second));
    ldm_job *ja = NULL, *jb = NULL;
    CHECK(ldm_generate_async(model, &req, &ja));
    CHECK(ldm_generate_async(second, &req, &jb));
    while (ldm_job_poll(ja) == LDM_PENDING || ldm_job_poll(jb) == LDM_PENDING) {
        sched_yield(); /* a UI thread would draw a frame here */
    }
    ldm_result *ra = NULL, *rb = NULL;
    CHECK(ldm_job_wait(ja, &ra));
    CHECK(ldm_job_wait(jb, &rb));
    ldm_image ia, ib;
    CHECK(ldm_result_image(ra, 0, &ia));
    CHECK(ldm_result_image(rb, 0, &ib));
    if (image_bytes(&ia) != image_bytes(&first) || memcmp(ia.rgb, first.rgb, image_bytes(&ia)) ||
        memcmp(ib.rgb, first.rgb, image_bytes(&ib))) {
        fprintf(stderr, "two models: the images differ from the first generation\n");
        return 1;
    }
    ldm_memory mem;
    CHECK(ldm_engine_memory(engine, &mem));
    printf("two models: identical images; engine holds %llu bytes (peak %llu)\n",
           (unsigned long long)(mem.live_bytes + mem.pooled_bytes),
           (unsigned long long)mem.peak_bytes);
    CHECK(ldm_result_free(ra));
    CHECK(ldm_result_free(rb));
    CHECK(ldm_job_free(ja));
    CHECK(ldm_job_free(jb));
    CHECK(ldm_model_unload(second));
    CHECK(ldm_engine_memory(engine, &mem));
    printf("unloaded the second model: engine holds %llu bytes\n",
           (unsigned long long)(mem.live_bytes + mem.pooled_bytes));
    CHECK(ldm_model_free(second));

    /* 4. The error path: a model that is not there. */
    ldm_model *missing = NULL;
    s = ldm_model_load(engine, "/nonexistent/model", NULL, &missing);
    if (s != LDM_ERR_MODEL || missing != NULL || strstr(ldm_last_error(), "/nonexistent") == NULL) {
        fprintf(stderr, "bad model path: status %d, message %s\n", s, ldm_last_error());
        return 1;
    }
    printf("bad model path: status %d\n  %s\n", s, ldm_last_error());
    /* and a freed handle is an error, not a crash */
    CHECK(ldm_result_free(result));
    if (ldm_result_free(result) != LDM_ERR_INVALID_HANDLE) {
        fprintf(stderr, "double free was not refused\n");
        return 1;
    }

    CHECK(ldm_model_free(model));
    CHECK(ldm_engine_free(engine));
    printf("ok\n");
    return 0;
}

// Embeds the device images built by csrc/tools/device_compile.py.
//
// Each fatbin goes into a `.nv_fatbin` section, where cuobjdump (--list-elf,
// --list-ptx) finds it in the built module; its ptxas log goes into .rodata with a
// terminating NUL. MOE_IMAGE_DIR (set by CMakeLists.txt) is the build folder that
// holds <name>.fatbin and <name>.ptxas.log.
#include "runtime.h"

#ifndef MOE_IMAGE_DIR
#error "MOE_IMAGE_DIR must name the folder of the built device images"
#endif

#define MOE_EMBED(NAME)                                                                          \
  asm(".pushsection .nv_fatbin, \"a\"\n"                                                       \
      ".balign 16\n"                                                                           \
      ".globl moe_image_" #NAME "_begin\n"                                                     \
      ".hidden moe_image_" #NAME "_begin\n"                                                    \
      "moe_image_" #NAME "_begin:\n"                                                           \
      ".incbin \"" MOE_IMAGE_DIR "/" #NAME ".fatbin\"\n"                                       \
      ".globl moe_image_" #NAME "_end\n"                                                       \
      ".hidden moe_image_" #NAME "_end\n"                                                      \
      "moe_image_" #NAME "_end:\n"                                                             \
      ".popsection\n"                                                                          \
      ".pushsection .rodata\n"                                                                 \
      ".globl moe_log_" #NAME "\n"                                                             \
      ".hidden moe_log_" #NAME "\n"                                                            \
      "moe_log_" #NAME ":\n"                                                                   \
      ".incbin \"" MOE_IMAGE_DIR "/" #NAME ".ptxas.log\"\n"                                    \
      ".byte 0\n"                                                                              \
      ".popsection\n");                                                                        \
  extern "C" const unsigned char moe_image_##NAME##_begin[];                                   \
  extern "C" const unsigned char moe_image_##NAME##_end[];                                     \
  extern "C" const char moe_log_##NAME[];

MOE_EMBED(routing)
MOE_EMBED(plan)
MOE_EMBED(permute)

namespace moe_ext {

const ImageBlob& image_blob(Image image) {
  static const ImageBlob blobs[kNumImages] = {
      {"routing", moe_image_routing_begin, static_cast<std::size_t>(moe_image_routing_end - moe_image_routing_begin),
       moe_log_routing},
      {"plan", moe_image_plan_begin, static_cast<std::size_t>(moe_image_plan_end - moe_image_plan_begin),
       moe_log_plan},
      {"permute", moe_image_permute_begin, static_cast<std::size_t>(moe_image_permute_end - moe_image_permute_begin),
       moe_log_permute},
  };
  return blobs[static_cast<int>(image)];
}

}  // namespace moe_ext

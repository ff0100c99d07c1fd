# Included by .ci/sanitizers.sh (cmake -DCMAKE_PROJECT_INCLUDE=.ci/sanitize.cmake
# -DDHSA_SANITIZE="-fsanitize=..."): once every target is defined, each of ours is compiled with the
# sanitizer at -O1 -g1 (the sanitizers' recommended level: exact reports at a third of the compile
# time of -O2 -g; -g1 keeps the line tables the reports need) and asserts on (-UNDEBUG). -Werror
# stays: a warning that only instrumentation brings out is still one in our code.
#
# dhsa_proto, the protoc/grpc_cpp_plugin output, is not ours and is left exactly as build/ compiles
# it: with ccache and CCACHE_BASEDIR (set by .ci/run) its objects then come from the cache instead of
# costing a third of each sanitizer build. Protobuf's parsing runs in libprotobuf, which is not
# instrumented either. Executables link the sanitizer runtime through CMAKE_EXE_LINKER_FLAGS.
if(NOT DHSA_SANITIZE)
  message(FATAL_ERROR "sanitize.cmake: set DHSA_SANITIZE to the -fsanitize=... flags")
endif()

function(_dhsa_ci_collect_targets dir out)
  get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
  get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
  foreach(sub IN LISTS subdirs)
    _dhsa_ci_collect_targets("${sub}" more)
    list(APPEND targets ${more})
  endforeach()
  set(${out} ${targets} PARENT_SCOPE)
endfunction()

function(_dhsa_ci_instrument)
  _dhsa_ci_collect_targets("${CMAKE_SOURCE_DIR}" targets)
  separate_arguments(flags UNIX_COMMAND "${DHSA_SANITIZE}")
  set(count 0)
  foreach(t IN LISTS targets)
    get_target_property(type ${t} TYPE)
    if(NOT type MATCHES "^(EXECUTABLE|STATIC_LIBRARY|SHARED_LIBRARY|MODULE_LIBRARY|OBJECT_LIBRARY)$"
       OR t STREQUAL "dhsa_proto")
      continue()
    endif()
    target_compile_options(${t} PRIVATE
      $<$<COMPILE_LANGUAGE:C,CXX>:${flags};-fno-omit-frame-pointer;-O1;-g1;-UNDEBUG>)
    # GCC 12 with -fsanitize=address at -O1 reports -Wmaybe-uninitialized inside libstdc++'s own
    # <regex> (std::function members of a moved _State; GCC PR 105616, a false positive), which
    # only test code includes. The warning stays, as a warning, for the test targets only; our
    # libraries and programs keep -Werror for it here, and the -O2 build/ keeps it everywhere.
    get_target_property(source_dir ${t} SOURCE_DIR)
    if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND DHSA_SANITIZE MATCHES "address"
       AND source_dir MATCHES "^${CMAKE_SOURCE_DIR}/tests(/|$)")
      target_compile_options(${t} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Wno-error=maybe-uninitialized>)
    endif()
    math(EXPR count "${count} + 1")
  endforeach()
  message(STATUS "sanitize.cmake: ${count} targets instrumented with ${DHSA_SANITIZE}")
endfunction()

cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL _dhsa_ci_instrument)
